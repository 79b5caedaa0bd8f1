//! Over mutual TLS on 127.0.0.1: handshake, migration offer, then 64 MiB of mixed guest pages
//! (zero, random, compressible) in PageBatch frames; the destination writes them into its own
//! memory and every page is checked. The throughput is printed beside a raw loopback TCP copy
//! of the same 64 MiB measured in the same test, as a ratio (printed, not asserted).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use migrate::frame::{
    read_message, read_message_with, write_message, write_message_with, Message, MigrateOffer,
};
use migrate::handshake::{
    client_handshake, server_handshake, CpuFeatures, Hello, Purpose, ServerIdentity,
};
use migrate::pages::{Compression, PageBatchBuilder, PAGE_SIZE};
use migrate::tls::{self, ClusterTls};

const MEM: usize = 64 << 20;
const PAGES: usize = MEM / PAGE_SIZE;

/// Source guest memory: a quarter zero pages, a quarter compressible text, half random.
fn source_memory() -> Vec<u8> {
    let mut mem = vec![0u8; MEM];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (gpn, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
        match gpn % 4 {
            0 => {}
            2 => {
                let line = format!("heap object {gpn:08x}: next=0, len=64; ");
                for (i, b) in page.iter_mut().enumerate() {
                    *b = line.as_bytes()[i % line.len()];
                }
            }
            _ => {
                for c in page.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    mem
}

fn timeouts(tls: ClusterTls) -> ClusterTls {
    tls.with_timeouts(Duration::from_secs(10), Some(Duration::from_secs(30)))
}

struct Received {
    pages: usize,
    zero_pages: usize,
    wire_bytes: usize,
}

fn migrate_over_tls(
    src: Arc<Vec<u8>>,
    tls_dir: &std::path::Path,
    compression: Compression,
) -> (Duration, Received) {
    let server_tls = timeouts(ClusterTls::load(tls_dir).unwrap());
    let client_tls = timeouts(ClusterTls::load(tls_dir).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let expected = src.clone();

    let dest = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut s = tls::accept(sock, &server_tls).unwrap();
        let ident = ServerIdentity {
            node_name: "dest".into(),
            host_cpu: CpuFeatures::default(),
        };
        let hello = server_handshake(&mut s, &ident, |_, _| Ok(())).unwrap();
        assert_eq!(hello.purpose, Purpose::Migrate);
        let offer = match read_message(&mut s).unwrap() {
            Message::MigrateOffer(o) => o,
            other => panic!("expected MigrateOffer, got {other:?}"),
        };
        write_message(&mut s, &Message::MigrateAccept { postcopy: false }).unwrap();
        // Destination memory starts as garbage, so zero pages must really arrive.
        let mut mem = vec![0xaau8; offer.mem_bytes as usize];
        let mut scratch = Vec::new();
        let mut frame = Vec::new();
        let mut got = Received {
            pages: 0,
            zero_pages: 0,
            wire_bytes: 0,
        };
        loop {
            match read_message_with(&mut s, &mut frame).unwrap() {
                Message::Pages(batch) => {
                    got.wire_bytes += batch.payload.len();
                    got.zero_pages += batch
                        .zero_map
                        .iter()
                        .map(|b| b.count_ones() as usize)
                        .sum::<usize>();
                    let decoded = batch.decode_with(&mut scratch).unwrap();
                    for (gpn, page) in decoded.iter() {
                        let at = gpn as usize * PAGE_SIZE;
                        mem[at..at + PAGE_SIZE].copy_from_slice(page);
                        got.pages += 1;
                    }
                }
                Message::RoundDone { round, dirty_pages } => {
                    assert_eq!((round, dirty_pages), (1, 0));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        write_message(&mut s, &Message::Resumed).unwrap();
        let bad = mem
            .chunks_exact(PAGE_SIZE)
            .zip(expected.chunks_exact(PAGE_SIZE))
            .position(|(a, b)| a != b);
        assert_eq!(bad, None, "first page that differs");
        got
    });

    let mut s = tls::connect(addr, &client_tls).unwrap();
    let hello = Hello::new("src", Purpose::Migrate, CpuFeatures::default(), None);
    client_handshake(&mut s, &hello).unwrap();
    write_message(
        &mut s,
        &Message::MigrateOffer(MigrateOffer {
            pid: 1,
            home_node: "src".into(),
            program: "p".into(),
            mem_bytes: MEM as u64,
            touched_pages: PAGES as u64,
            page_size: PAGE_SIZE as u32,
            regions: vec![],
            deputy_token: None,
        }),
    )
    .unwrap();
    assert_eq!(
        read_message(&mut s).unwrap(),
        Message::MigrateAccept { postcopy: false }
    );

    let start = Instant::now();
    let mut b = PageBatchBuilder::with_compression(compression);
    let mut frame = Vec::new();
    for (gpn, page) in src.as_chunks::<PAGE_SIZE>().0.iter().enumerate() {
        if b.is_full() {
            let msg = Message::Pages(b.finish());
            write_message_with(&mut s, &msg, &mut frame).unwrap();
            if let Message::Pages(batch) = msg {
                b.recycle(batch);
            }
        }
        b.push(gpn as u64, page).unwrap();
    }
    if !b.is_empty() {
        write_message_with(&mut s, &Message::Pages(b.finish()), &mut frame).unwrap();
    }
    write_message(
        &mut s,
        &Message::RoundDone {
            round: 1,
            dirty_pages: 0,
        },
    )
    .unwrap();
    assert_eq!(read_message(&mut s).unwrap(), Message::Resumed);
    let took = start.elapsed();
    (took, dest.join().unwrap())
}

fn raw_tcp_copy(src: Arc<Vec<u8>>) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut mem = vec![0u8; MEM];
        sock.read_exact(&mut mem).unwrap();
        sock.write_all(&[1]).unwrap();
        mem
    });
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = Instant::now();
    for chunk in src.chunks(1 << 20) {
        sock.write_all(chunk).unwrap();
    }
    let mut ack = [0u8; 1];
    sock.read_exact(&mut ack).unwrap();
    let took = start.elapsed();
    let mem = dest.join().unwrap();
    assert!(mem[..] == src[..], "raw copy arrived intact");
    took
}

#[test]
fn sixty_four_mib_of_pages_over_tls_arrive_intact() {
    let dir = tempfile::tempdir().unwrap();
    tls::keygen(dir.path()).unwrap();
    let src = Arc::new(source_memory());
    let mib = MEM as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();

    // Best of three, interleaved, so that both see the same machine.
    let mut raw = Duration::MAX;
    let mut auto = Duration::MAX;
    let mut never = Duration::MAX;
    let mut wire = 0;
    for _ in 0..3 {
        raw = raw.min(raw_tcp_copy(src.clone()));
        for (c, best) in [
            (Compression::Auto, &mut auto),
            (Compression::Never, &mut never),
        ] {
            let (t, got) = migrate_over_tls(src.clone(), dir.path(), c);
            assert_eq!(got.pages, PAGES);
            assert_eq!(got.zero_pages, PAGES / 4);
            if c == Compression::Auto {
                assert!(got.wire_bytes < MEM / 4 * 3, "lz4 shrinks the text pages");
                wire = got.wire_bytes;
            } else {
                assert_eq!(got.wire_bytes, MEM / 4 * 3);
            }
            *best = (*best).min(t);
        }
    }
    println!(
        "64 MiB of mixed pages (1/4 zero, 1/4 text, 1/2 random), best of 3:\n  \
         raw loopback TCP copy:        {:6.0} MiB/s\n  \
         TLS PageBatch, lz4 auto:      {:6.0} MiB/s  ({:.1} MiB payload)  ratio {:.2}\n  \
         TLS PageBatch, no lz4:        {:6.0} MiB/s  ({:.1} MiB payload)  ratio {:.2}",
        rate(raw),
        rate(auto),
        wire as f64 / (1 << 20) as f64,
        rate(auto) / rate(raw),
        rate(never),
        (MEM / 4 * 3) as f64 / (1 << 20) as f64,
        rate(never) / rate(raw),
    );
}
