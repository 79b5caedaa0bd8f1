//! The node's side of node-to-node connections: mutual TLS with the cluster key, one
//! `migrate` frame at a time; answering a peer (a guest host for an arriving process, this
//! node's load), and asking a peer to start a guest host for a process leaving.

use crate::control::Reply;
use crate::node::{resolve, Shared};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;

/// How long each step of talking to a peer may take (connecting, the TLS handshake, the
/// Hello/Welcome exchange, each request and its answer) before the peer counts as unreachable.
pub(crate) const STEP_LIMIT: std::time::Duration = crate::wire::HANDSHAKE_LIMIT;

/// `f`, or an error naming `what` if it takes longer than [`STEP_LIMIT`].
pub(crate) async fn within<T>(
    what: impl std::fmt::Display,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(STEP_LIMIT, f).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("{what}: no answer within {} s", STEP_LIMIT.as_secs()),
    }
}

/// Read one `migrate` frame from an async stream.
pub(crate) async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::result::Result<migrate::Message, migrate::FrameError> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; migrate::frame::HEADER_LEN];
    r.read_exact(&mut h).await?;
    let header = migrate::frame::parse_header(&h)?;
    let mut buf = h.to_vec();
    buf.resize(migrate::frame::HEADER_LEN + header.len as usize, 0);
    r.read_exact(&mut buf[migrate::frame::HEADER_LEN..]).await?;
    Ok(migrate::frame::decode_frame(&buf)?.0)
}

pub(crate) async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    m: &migrate::Message,
) -> Result<()> {
    w.write_all(&migrate::frame::encode_frame(m)?).await?;
    w.flush().await?;
    Ok(())
}

/// Open an authenticated link to a peer for `purpose`: connect, TLS with the cluster key,
/// Hello/Welcome, each within [`STEP_LIMIT`]. `expect`: the name the peer was asked for by
/// (None when it was given by address); a peer whose Welcome names another node is refused,
/// so that a move to "n2" never lands on whichever node answers at n2's listed address.
pub(crate) async fn connect_peer(
    tls: &migrate::ClusterTls,
    addr: SocketAddr,
    me: &str,
    purpose: migrate::Purpose,
    expect: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = within(format!("connecting to {addr}"), async {
        tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))
    })
    .await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    let name = rustls_pki_types::ServerName::try_from(migrate::tls::CLUSTER_NAME)?;
    let mut s = within(format!("TLS with {addr}"), async {
        connector
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {addr}"))
    })
    .await?;
    let hello = migrate::Hello::new(me, purpose, crate::migration::host_features(), None);
    let answer = within(format!("the handshake with {addr}"), async {
        write_frame(&mut s, &migrate::Message::Hello(hello)).await?;
        Ok(read_frame(&mut s).await?)
    })
    .await?;
    match answer {
        migrate::Message::Welcome(w) => match expect {
            Some(want) if w.node_name != want => {
                tracing::warn!(%addr, want, says = w.node_name, "refused a peer under another node's name");
                anyhow::bail!(
                    "the node at {addr} is '{}', not '{want}' (check the --peer list); refused",
                    w.node_name
                )
            }
            _ => Ok(s),
        },
        migrate::Message::Refuse { reason } => anyhow::bail!("{addr} refused: {reason}"),
        other => anyhow::bail!("{addr} answered {:?}", other.kind()),
    }
}

/// Serve one peer connection: TLS (cluster key required), handshake, then by purpose.
pub(crate) async fn serve_peer(tcp: tokio::net::TcpStream, shared: Shared) -> Result<()> {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    tcp.set_nodelay(true)?;
    let (tls, name) = {
        let st = shared.lock().expect("state lock");
        (st.tls.clone(), st.name.clone())
    };
    let Some(tls) = tls else { return Ok(()) };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let accepted =
        tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await;
    let mut s = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(peer, "refused a peer without the cluster key: {e}");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(peer, "TLS handshake timed out");
            return Ok(());
        }
    };
    let first = match tokio::time::timeout(STEP_LIMIT, read_frame(&mut s)).await {
        Ok(f) => f,
        Err(_) => {
            tracing::warn!(peer, "no Hello within {} s", STEP_LIMIT.as_secs());
            return Ok(());
        }
    };
    let ours = migrate::handshake::ServerIdentity {
        node_name: name,
        host_cpu: crate::migration::host_features(),
    };
    let (reply, hello) = migrate::handshake::answer(first.as_ref().cloned(), &ours, |_, _| Ok(()));
    let _ = write_frame(&mut s, &reply).await;
    let Some(hello) = hello else {
        tracing::warn!(peer, ?reply, "refused a peer");
        return Ok(());
    };
    match hello.purpose {
        migrate::Purpose::Migrate => {
            let request = within(format!("{peer}: the host request"), async {
                Ok(read_frame(&mut s).await)
            })
            .await?;
            let (pid, home, program) = match request {
                Ok(migrate::Message::Host {
                    pid,
                    home_node,
                    program,
                }) => (pid, home_node, program),
                Ok(other) => anyhow::bail!("{peer}: expected Host, got {:?}", other.kind()),
                Err(e) => anyhow::bail!("{peer}: reading the host request: {e}"),
            };
            let blocked = {
                let st = shared.lock().expect("state lock");
                st.admin.block && home != st.name
            };
            let started = if blocked {
                Err(anyhow::anyhow!(
                    "node blocks arriving guests (mosvm ctl noblock)"
                ))
            } else {
                crate::hosting::start_guest_host(&shared, pid, &home, &program)
            };
            let answer = match started {
                Ok((port, token)) => {
                    tracing::info!(
                        peer,
                        from = hello.node_name,
                        pid,
                        home,
                        port,
                        "receiving a guest: guest host started"
                    );
                    migrate::Message::Hosting { port, token }
                }
                Err(e) => {
                    tracing::warn!(peer, pid, home, "cannot start a guest host: {e:#}");
                    migrate::Message::Refuse {
                        reason: format!("cannot start a guest host: {e:#}"),
                    }
                }
            };
            write_frame(&mut s, &answer).await?;
            Ok(())
        }
        migrate::Purpose::Control => {
            // A peer asking how this node is doing.
            let info = crate::admin::nodes_view(&shared.lock().expect("state lock")).remove(0);
            let load = migrate::Message::Load {
                cpus: info.cpus.ceil() as u32,
                load: info.load,
                free_mem: info.free_mem,
            };
            write_frame(&mut s, &load).await
        }
        other => {
            tracing::warn!(peer, ?other, "purpose not served yet");
            Ok(())
        }
    }
}

/// Have node `to` start a guest host for process `pid` (whose home is here, or which is
/// hosted here), and say where it waits.
pub(crate) async fn link(shared: &Shared, pid: u32, to: &str) -> Result<Reply> {
    let (tls, addr, me, who) = {
        let st = shared.lock().expect("state lock");
        let who = match st.procs.get(&pid) {
            Some(p) => Some((st.name.clone(), p.info.program.clone())),
            None => st
                .hosted
                .values()
                .find(|h| h.pid == pid)
                .map(|h| (h.home.clone(), h.program.clone())),
        };
        (st.tls.clone(), resolve(&st, to), st.name.clone(), who)
    };
    let tls = tls.context("this node has no cluster key")?;
    let addr = addr.map_err(|m| anyhow::anyhow!(m))?;
    let (home, program) = who.with_context(|| format!("no process {pid} on node {me}"))?;
    let by_name = to.parse::<SocketAddr>().is_err().then_some(to);
    let mut peer = connect_peer(&tls, addr, &me, migrate::Purpose::Migrate, by_name).await?;
    let host = migrate::Message::Host {
        pid,
        home_node: home,
        program,
    };
    let answer = within(format!("{to}: starting a guest host"), async {
        write_frame(&mut peer, &host).await?;
        Ok(read_frame(&mut peer).await?)
    })
    .await?;
    match answer {
        migrate::Message::Hosting { port, token } => {
            tracing::info!(pid, to, port, "guest host ready");
            Ok(Reply::Endpoint {
                addr: SocketAddr::new(addr.ip(), port).to_string(),
                token: crate::control::hex(&token),
                cert: crate::control::hex(tls.cert()),
            })
        }
        migrate::Message::Refuse { reason } => anyhow::bail!("{to} refused: {reason}"),
        other => anyhow::bail!("{to} answered {:?}", other.kind()),
    }
}
