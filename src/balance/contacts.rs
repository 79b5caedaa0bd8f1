//! Where the other nodes are: learning contacts, forgetting dead ones, asking configured
//! addresses who they are, and the address book a gossip message carries.

use super::*;

impl Shell {
    /// Remember where a node is; join SWIM through it the first time.
    pub(super) async fn learn(&mut self, c: Contact) {
        if c.id == self.me.id {
            return;
        }
        {
            let mut st = self.shared.lock().expect("state lock");
            // A peer configured under another name at this address: the operator's name is
            // wrong (it would stay listed as down forever). Say so once and drop it.
            for (name, addr) in &self.seeds {
                if let Some(name) = name.as_deref() {
                    if *addr == c.addr && name != c.name {
                        let wrong = gossip::node_id(name);
                        let first = self.misnamed.insert((name.to_string(), *addr));
                        if st.directory.remove(&wrong).is_some() && first {
                            tracing::warn!(
                                configured = name,
                                addr = %addr,
                                node = c.name,
                                "the peer configured under this name calls itself otherwise"
                            );
                        }
                    }
                }
            }
            match st.directory.get(&c.id) {
                Some(old) if old.name != c.name => {
                    tracing::warn!(
                        a = old.name,
                        b = c.name,
                        "two node names share an id; ignoring the second"
                    );
                    return;
                }
                Some(old) if old.addr != c.addr => {
                    // Two nodes under one name (or a node that moved): the latest wins.
                    tracing::warn!(
                        node = c.name,
                        was = %old.addr,
                        now = %c.addr,
                        "a node name answers from another address"
                    );
                    st.directory.insert(c.id, c.clone());
                }
                _ => {
                    st.directory.insert(c.id, c.clone());
                }
            }
        }
        if self.joined.insert(c.id) {
            let acts = self.call(Call::Start { known: Some(c.id) });
            self.act(acts).await;
        }
    }

    /// Announce this node again to the configured peers SWIM does not list (they may have
    /// started after us, or the first announcement was lost), every [`REANNOUNCE`].
    pub(super) async fn reannounce(&mut self) {
        if self.announced.elapsed() < REANNOUNCE {
            return;
        }
        self.announced = Instant::now();
        let seeds: Vec<NodeId> = {
            let mut st = self.shared.lock().expect("state lock");
            let addrs: HashSet<SocketAddr> = self.seeds.iter().map(|(_, a)| *a).collect();
            // Forget nodes long down that nobody configured.
            let gone: Vec<NodeId> = self
                .down_since
                .iter()
                .filter(|(_, t)| t.elapsed() > FORGET)
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.down_since.remove(&id);
                if st
                    .directory
                    .get(&id)
                    .is_some_and(|c| !addrs.contains(&c.addr))
                {
                    st.directory.remove(&id);
                }
            }
            st.directory
                .values()
                .filter(|c| addrs.contains(&c.addr))
                .map(|c| c.id)
                .collect()
        };
        for id in seeds {
            if !self.core.peers().contains(&id) {
                let acts = self.call(Call::Start { known: Some(id) });
                self.act(acts).await;
            }
        }
    }

    /// Ask configured addresses whose node we do not know yet who they are.
    pub(super) async fn hello_unknown(&mut self) {
        let known: HashSet<SocketAddr> = {
            let st = self.shared.lock().expect("state lock");
            st.directory.values().map(|c| c.addr).collect()
        };
        let unknown: Vec<SocketAddr> = self
            .seeds
            .iter()
            .map(|(_, a)| *a)
            .filter(|a| !known.contains(a) && *a != self.me.addr)
            .collect();
        for a in unknown {
            self.send_to(a, Body::Hello { answer: true }).await;
        }
    }

    /// Contacts to send with a gossip message: this node, the nodes its entries are about,
    /// then others at random, at most [`gossip::MAX_BOOK`].
    pub(super) fn book(&mut self, entries: &[LoadEntry]) -> Vec<Contact> {
        let st = self.shared.lock().expect("state lock");
        let mut out = vec![self.me.clone()];
        // Only members SWIM holds up: a dead node's address must not circulate for ever.
        let up: HashSet<NodeId> = self.core.peers().iter().copied().collect();
        for e in entries {
            if let Some(c) = st.directory.get(&e.node).filter(|c| up.contains(&c.id)) {
                if out.len() < gossip::MAX_BOOK && !out.iter().any(|o| o.id == c.id) {
                    out.push(c.clone());
                }
            }
        }
        let rest: Vec<&Contact> = st
            .directory
            .values()
            .filter(|c| up.contains(&c.id) && !out.iter().any(|o| o.id == c.id))
            .collect();
        let room = gossip::MAX_BOOK.saturating_sub(out.len());
        if rest.len() <= room {
            out.extend(rest.into_iter().cloned());
        } else {
            for _ in 0..room {
                let c = rest[self.rng.random_range(0..rest.len())];
                if !out.iter().any(|o| o.id == c.id) {
                    out.push(c.clone());
                }
            }
        }
        out
    }
}
