//! The node's datagram socket, receiving side: every datagram is checked
//! ([`crate::gossip::Opener`]) before the balancer sees it; the rejected are counted.

use crate::gossip::{self, Envelope, Opener, Reject};
use crate::node::Shared;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Receive datagrams on `udp`, check them and pass the good ones on; count the bad.
pub async fn receive(
    udp: Arc<UdpSocket>,
    key: [u8; 32],
    shared: Shared,
    out: mpsc::UnboundedSender<Envelope>,
) {
    let mut opener = Opener::new(key);
    let mut buf = vec![0u8; gossip::MAX_DATAGRAM + 1];
    let mut warned: HashSet<(SocketAddr, &'static str)> = HashSet::new();
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("udp: {e}");
                continue;
            }
        };
        match opener.open(&buf[..n], crate::balance::unix_ms()) {
            Ok(env) => {
                if out.send(env).is_err() {
                    return;
                }
            }
            Err(r) => {
                let name = r.as_str();
                metrics::counter!("mosvm_datagrams_rejected_total", "reason" => name).increment(1);
                {
                    let mut st = shared.lock().expect("state lock");
                    *st.view
                        .counters
                        .rejected
                        .entry(name.to_string())
                        .or_default() += 1;
                }
                if r == Reject::BadMac && warned.insert((from, name)) {
                    tracing::warn!(%from, "dropped a datagram without the cluster key's MAC");
                } else {
                    tracing::debug!(%from, reason = name, "dropped a datagram");
                }
            }
        }
    }
}
