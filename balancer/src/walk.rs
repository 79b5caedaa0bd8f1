//! The order in which a node gossips to its peers.

use rand::Rng;

/// A random cyclic walk over the peer list: a random start and a random stride coprime with
/// the list's length visit every index once per cycle; each cycle draws both anew. It keeps the
/// randomness of the paper's "a randomly chosen node" (§3.1) while bounding how long a peer
/// goes without a message (as SWIM's round-robin probe order does), in O(1) memory per node.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerWalk {
    pos: usize,
    stride: usize,
    left: usize,
    len: usize,
}

impl PeerWalk {
    /// The next index in `0..n`.
    pub(crate) fn next(&mut self, n: usize, rng: &mut impl Rng) -> usize {
        if self.left == 0 || self.len != n {
            self.len = n;
            self.left = n;
            self.pos = rng.random_range(0..n);
            self.stride = 1;
            if n > 2 {
                for _ in 0..32 {
                    let s = rng.random_range(1..n);
                    if gcd(s, n) == 1 {
                        self.stride = s;
                        break;
                    }
                }
            }
        }
        self.left -= 1;
        self.pos = (self.pos + self.stride) % n;
        self.pos
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
