//! Mutual TLS between nodes with the cluster key (rustls 0.23, ring provider, TLS 1.3 only).
//!
//! `mosvm keygen` calls [`keygen`]: it writes one self-signed certificate ([`CERT_FILE`], SAN
//! [`CLUSTER_NAME`]) and its private key ([`KEY_FILE`], mode 0600) that every node of the
//! cluster shares. [`ClusterTls::load`] turns them into a server configuration that requires a
//! client certificate chaining to the cluster certificate, and a client configuration that
//! trusts only the cluster certificate and presents it. A peer without the cluster key never
//! gets past [`accept`] / [`connect`]: both return [`TlsError::Handshake`].

use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The certificate file in a key directory.
pub const CERT_FILE: &str = "cluster.crt";
/// The private key file in a key directory (mode 0600).
pub const KEY_FILE: &str = "cluster.key";
/// The name every node's certificate is issued for and every client checks.
pub const CLUSTER_NAME: &str = "mosvm-cluster";
/// Default limit on connecting and on the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS stream from [`connect`].
pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;
/// A TLS stream from [`accept`].
pub type ServerStream = StreamOwned<ServerConnection, TcpStream>;

/// Errors of key handling and of TLS connections.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// (The I/O error is part of the message, not a separate cause: said once.)
    #[error("{}: {error}", .path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("{} already exists; refusing to overwrite the cluster key", .0.display())]
    KeyExists(PathBuf),
    #[error("{} is accessible by others (mode {mode:o}); it must be 0600", .path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{}: {detail}", .path.display())]
    Pem { path: PathBuf, detail: String },
    #[error("key generation failed: {0}")]
    Keygen(String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake { peer: String, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |error| TlsError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Generates the cluster key in `dir` (created 0700 if missing); refuses to overwrite an
/// existing key.
pub fn keygen(dir: &Path) -> Result<(), TlsError> {
    keygen_with(dir, false)
}

/// Like [`keygen`], replacing an existing key when `overwrite` is true.
pub fn keygen_with(dir: &Path, overwrite: bool) -> Result<(), TlsError> {
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    if !overwrite && fs::symlink_metadata(&key_path).is_ok() {
        return Err(TlsError::KeyExists(key_path));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;

    let mut params = rcgen::CertificateParams::new(vec![CLUSTER_NAME.to_string()])
        .map_err(|e| TlsError::Keygen(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mosvm cluster");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Keygen(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::Keygen(e.to_string()))?;

    // Write both beside their final names, then rename: a reader never sees half a key.
    let key_tmp = dir.join(format!(".{KEY_FILE}.tmp"));
    let cert_tmp = dir.join(format!(".{CERT_FILE}.tmp"));
    write_file(&key_tmp, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_tmp, cert.pem().as_bytes(), 0o644)?;
    fs::rename(&cert_tmp, &cert_path).map_err(io_err(&cert_path))?;
    fs::rename(&key_tmp, &key_path).map_err(io_err(&key_path))?;
    Ok(())
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    // The mode given at creation is filtered by the umask; set it exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The cluster's TLS configurations, loaded once and shared by every connection.
#[derive(Clone)]
pub struct ClusterTls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    endpoint: Arc<ServerConfig>,
    cert: CertificateDer<'static>,
    handshake_timeout: Duration,
    io_timeout: Option<Duration>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("io_timeout", &self.io_timeout)
            .finish_non_exhaustive()
    }
}

impl ClusterTls {
    /// Loads the key written by [`keygen`] from `dir`. The key file must not be readable by
    /// group or others.
    pub fn load(dir: &Path) -> Result<ClusterTls, TlsError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let meta = fs::metadata(&key_path).map_err(io_err(&key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        let cert_pem = fs::read(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read(&key_path).map_err(io_err(&key_path))?;
        let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| TlsError::Pem {
            path: cert_path.clone(),
            detail: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            detail: e.to_string(),
        })?;
        Self::from_der(cert, key)
    }

    /// Builds the configurations from the cluster certificate and key.
    pub fn from_der(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ClusterTls, TlsError> {
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let mut provider = rustls::crypto::ring::default_provider();
        // Both ends are ours: prefer AES-128-GCM, the fastest suite on AES-NI hardware.
        provider.cipher_suites = vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ];
        let provider = Arc::new(provider);
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).map_err(cfg)?;
        let roots = Arc::new(roots);

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .map_err(cfg)?;
        // Connections are long-lived and never resumed.
        server.send_tls13_tickets = 0;

        // A process endpoint (a guest host) proves it holds the cluster key; its client proves
        // itself with the one-time token the nodes agreed on over mutual TLS.
        let mut endpoint = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .map_err(cfg)?;
        endpoint.send_tls13_tickets = 0;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert.clone()], key)
            .map_err(cfg)?;
        client.resumption = Resumption::disabled();

        Ok(ClusterTls {
            server: Arc::new(server),
            client: Arc::new(client),
            endpoint: Arc::new(endpoint),
            cert,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            io_timeout: None,
        })
    }

    /// Sets the limit on connecting and on the handshake, and the read/write timeout left on
    /// the socket afterwards (`None`: block; the deputy channel idles while the guest computes).
    pub fn with_timeouts(mut self, handshake: Duration, io: Option<Duration>) -> ClusterTls {
        self.handshake_timeout = handshake;
        self.io_timeout = io;
        self
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The server side of a process endpoint: the cluster certificate, no client certificate
    /// asked (the client presents a token inside the session).
    pub fn endpoint_config(&self) -> Arc<ServerConfig> {
        self.endpoint.clone()
    }

    /// The cluster certificate (public): what an endpoint's client must see.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }
}

/// The client side of a process endpoint: accepts only a server holding the cluster key
/// (`cert` is the cluster certificate), presents no certificate.
pub fn endpoint_client_config(
    cert: CertificateDer<'static>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    let mut roots = RootCertStore::empty();
    roots.add(cert).map_err(cfg)?;
    let mut client = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = Resumption::disabled();
    Ok(Arc::new(client))
}

/// A fresh random 256-bit token (from the system's CSPRNG).
pub fn new_token() -> Result<[u8; 32], TlsError> {
    use rustls::crypto::ring::default_provider;
    let mut t = [0u8; 32];
    default_provider()
        .secure_random
        .fill(&mut t)
        .map_err(|_| TlsError::Keygen("no randomness".into()))?;
    Ok(t)
}

/// Compares two tokens in time independent of where they differ.
pub fn tokens_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn prepare(sock: &TcpStream, timeout: Duration) -> io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))
}

fn finish_handshake<C, S>(conn: &mut C, sock: &mut TcpStream, tls: &ClusterTls) -> io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    while conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    sock.set_read_timeout(tls.io_timeout)?;
    sock.set_write_timeout(tls.io_timeout)
}

/// Connects to a node and completes the TLS handshake, presenting the cluster certificate and
/// accepting only a server that holds it.
pub fn connect<A: ToSocketAddrs>(addr: A, tls: &ClusterTls) -> Result<ClientStream, TlsError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| TlsError::Connect {
            addr: "(unresolved)".into(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address");
    let mut found = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, tls.handshake_timeout) {
            Ok(s) => {
                found = Some((s, *a));
                break;
            }
            Err(e) => last = e,
        }
    }
    let Some((mut sock, peer)) = found else {
        return Err(TlsError::Connect {
            addr: format!("{addrs:?}"),
            source: last,
        });
    };
    let hs = |source| TlsError::Handshake {
        peer: peer.to_string(),
        source,
    };
    prepare(&sock, tls.handshake_timeout).map_err(hs)?;
    let name = ServerName::try_from(CLUSTER_NAME).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut conn = ClientConnection::new(tls.client.clone(), name)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    finish_handshake(&mut conn, &mut sock, tls).map_err(hs)?;
    Ok(StreamOwned::new(conn, sock))
}

/// Completes the server side of the TLS handshake on an accepted socket; a client without a
/// certificate chaining to the cluster certificate is refused.
pub fn accept(mut sock: TcpStream, tls: &ClusterTls) -> Result<ServerStream, TlsError> {
    let peer = sock
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "(unknown peer)".into());
    let hs = |source| TlsError::Handshake {
        peer: peer.clone(),
        source,
    };
    prepare(&sock, tls.handshake_timeout).map_err(hs)?;
    let mut conn =
        ServerConnection::new(tls.server.clone()).map_err(|e| TlsError::Config(e.to_string()))?;
    finish_handshake(&mut conn, &mut sock, tls).map_err(hs)?;
    Ok(StreamOwned::new(conn, sock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{read_message, write_message, Message};
    use crate::handshake::{
        client_handshake, server_handshake, CpuFeatures, Hello, Purpose, ServerIdentity,
    };
    use std::net::TcpListener;
    use std::thread;

    fn quick(tls: ClusterTls) -> ClusterTls {
        tls.with_timeouts(Duration::from_secs(5), Some(Duration::from_secs(5)))
    }

    fn keydir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        keygen(d.path()).unwrap();
        d
    }

    #[test]
    fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("keys");
        keygen(&dir).unwrap();
        let key = dir.join(KEY_FILE);
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let pem = fs::read_to_string(&key).unwrap();
        assert!(pem.contains("PRIVATE KEY"));
        let cert1 = fs::read(dir.join(CERT_FILE)).unwrap();
        assert!(matches!(keygen(&dir), Err(TlsError::KeyExists(_))));
        assert_eq!(fs::read(dir.join(CERT_FILE)).unwrap(), cert1, "left intact");
        keygen_with(&dir, true).unwrap();
        assert_ne!(fs::read(dir.join(CERT_FILE)).unwrap(), cert1, "replaced");
        assert!(ClusterTls::load(&dir).is_ok());
        assert!(!dir.join(format!(".{KEY_FILE}.tmp")).exists());
    }

    #[test]
    fn load_rejects_a_readable_key_and_garbage() {
        let d = keydir();
        let key = d.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ClusterTls::load(d.path()),
            Err(TlsError::KeyPermissions { mode: 0o644, .. })
        ));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(d.path().join(CERT_FILE), "not a certificate").unwrap();
        assert!(matches!(
            ClusterTls::load(d.path()),
            Err(TlsError::Pem { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            ClusterTls::load(empty.path()),
            Err(TlsError::Io { .. })
        ));
    }

    /// Runs `server` on one accepted loopback connection in a thread.
    fn serve<T: Send + 'static>(
        f: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (SocketAddr, thread::JoinHandle<T>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = thread::spawn(move || f(l.accept().unwrap().0));
        (addr, h)
    }

    #[test]
    fn same_key_talks_through_handshake_and_frames() {
        let d = keydir();
        let server_tls = quick(ClusterTls::load(d.path()).unwrap());
        let client_tls = quick(ClusterTls::load(d.path()).unwrap());
        let (addr, h) = serve(move |sock| {
            let mut s = accept(sock, &server_tls).unwrap();
            let ident = ServerIdentity {
                node_name: "b".into(),
                host_cpu: CpuFeatures::default(),
            };
            let hello = server_handshake(&mut s, &ident, |_, _| Ok(())).unwrap();
            match read_message(&mut s).unwrap() {
                Message::Ping { t } => write_message(&mut s, &Message::Pong { t: t + 1 }).unwrap(),
                other => panic!("expected Ping, got {other:?}"),
            }
            hello.node_name
        });
        let mut c = connect(addr, &client_tls).unwrap();
        let hello = Hello::new("a", Purpose::Control, CpuFeatures::default(), None);
        let w = client_handshake(&mut c, &hello).unwrap();
        assert_eq!(w.node_name, "b");
        write_message(&mut c, &Message::Ping { t: 41 }).unwrap();
        assert_eq!(read_message(&mut c).unwrap(), Message::Pong { t: 42 });
        assert_eq!(h.join().unwrap(), "a");
    }

    #[test]
    fn another_clusters_key_is_refused_on_both_sides() {
        let ours = keydir();
        let theirs = keydir();
        let server_tls = quick(ClusterTls::load(ours.path()).unwrap());
        let client_tls = quick(ClusterTls::load(theirs.path()).unwrap());
        let (addr, h) = serve(move |sock| accept(sock, &server_tls).map(|_| ()));
        let client = connect(addr, &client_tls);
        assert!(
            matches!(client, Err(TlsError::Handshake { .. })),
            "client: {client:?}"
        );
        let server = h.join().unwrap();
        assert!(
            matches!(server, Err(TlsError::Handshake { .. })),
            "server: {server:?}"
        );
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        // A TLS client that trusts the cluster but presents no certificate of its own.
        let d = keydir();
        let server_tls = quick(ClusterTls::load(d.path()).unwrap());
        let cert = CertificateDer::from_pem_file(d.path().join(CERT_FILE)).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let anon =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let (addr, h) = serve(move |sock| accept(sock, &server_tls).map(|_| ()));
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn =
            ClientConnection::new(Arc::new(anon), ServerName::try_from(CLUSTER_NAME).unwrap())
                .unwrap();
        let mut s = StreamOwned::new(conn, sock);
        // The client's half of TLS 1.3 may complete; the server's refusal arrives on first use.
        let r = write_message(&mut s, &Message::Ping { t: 1 }).and_then(|_| read_message(&mut s));
        assert!(r.is_err(), "anonymous client got {r:?}");
        assert!(matches!(h.join().unwrap(), Err(TlsError::Handshake { .. })));
    }

    #[test]
    fn a_plain_tcp_client_is_refused() {
        let d = keydir();
        let server_tls = quick(ClusterTls::load(d.path()).unwrap());
        let (addr, h) = serve(move |sock| accept(sock, &server_tls).map(|_| ()));
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let hello = Hello::new("plain", Purpose::Control, CpuFeatures::default(), None);
        write_message(&mut sock, &Message::Hello(hello)).unwrap();
        // Whatever comes back (a TLS alert or a closed socket) is not a Welcome.
        let r = read_message(&mut sock);
        assert!(r.is_err(), "plain client got {r:?}");
        assert!(matches!(h.join().unwrap(), Err(TlsError::Handshake { .. })));
    }

    #[test]
    fn connect_to_a_closed_port_is_a_connect_error() {
        let d = keydir();
        let tls = quick(ClusterTls::load(d.path()).unwrap());
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(matches!(
            connect(("127.0.0.1", port), &tls),
            Err(TlsError::Connect { .. })
        ));
    }
}
