//! Tests of the choke point (`marshal.rs`): every host call built from any request stays
//! inside its own buffers.

use super::*;
use crate::table::{Class, TABLE};
use proptest::prelude::*;

use super::FixedFds as Fake;

fn home_rows() -> Vec<(u64, &'static [A])> {
    TABLE
        .iter()
        .filter_map(|e| match e.class {
            Class::Home(s) => Some((e.nr as u64, s)),
            _ => None,
        })
        .collect()
}

fn arg() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..20,
        any::<u64>(),
        Just(u64::MAX),
        Just(1 << 40),
        Just(0x7fff_f000),
        (0u64..1 << 20),
        Just(libc::AT_FDCWD as u32 as u64),
        // ioctl requests and fcntl commands the tables know.
        prop::sample::select(vec![
            0x5401u64,
            0x5413,
            0x541b,
            0x4004_9409,
            0x8910,
            5,
            7,
            36,
            // IPC_STAT, GETALL, SETALL.
            2,
            13,
            17
        ]),
    ]
}

fn msg_blob() -> impl Strategy<Value = Vec<u8>> {
    (
        0u32..200,
        0u32..100,
        0u64..300,
        prop::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(|(name_len, control_len, data_len, body)| {
            let mut b = MsgHead {
                name_len,
                control_len,
                flags: 0,
                data_len,
            }
            .to_bytes()
            .to_vec();
            b.extend_from_slice(&body);
            b
        })
}

fn slot() -> impl Strategy<Value = Slot> {
    prop_oneof![
        Just(Slot::Null),
        Just(Slot::Fault),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Slot::In),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Slot::InOut),
        msg_blob().prop_map(Slot::In),
        msg_blob().prop_map(Slot::InOut),
        (0usize..5000).prop_map(Slot::Out),
        Just(Slot::Out(usize::MAX)),
    ]
}

fn request() -> impl Strategy<Value = (Request, &'static [A])> {
    let rows = home_rows();
    (
        prop::sample::select(rows),
        prop::array::uniform6(arg()),
        prop::collection::vec(slot(), 0..8),
    )
        .prop_map(|((nr, base), args, slots)| (Request { nr, args, slots }, base))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Whatever a request holds, the host call built from it touches only its own buffers,
    /// and the reply never carries more than those buffers.
    #[test]
    fn host_calls_stay_inside_their_buffers(
        (req, base) in request(),
        ret in prop_oneof![Just(-14i64), 0i64..5000, Just(i64::MAX)],
    ) {
        let nr = req.nr;
        if let Ok(mut call) = Call::prepare(req, base, &Fake) {
            let a = call.host_args();
            prop_assert_eq!(call.verify(&a), Ok(()), "{}", table::name(nr));
            // An fd_set comes back in the guest's size (at most MAX_FDS bits).
            let sets = call.fdset_maps.len() * fdset_bytes(MAX_FDS as u64);
            let total: usize = call.bufs.iter().flatten().map(Vec::len).sum::<usize>()
                + sets
                + call.msg.as_ref().map_or(0, |m| {
                    MSG_HEAD + m.name.len() + m.control.len() + m.data.len()
                });
            let reply = call.finish(ret, &mut Fake);
            let back: usize = reply.outs.iter().map(Vec::len).sum();
            prop_assert!(back <= total.max(MSG_HEAD), "{}: {back} > {total}", table::name(nr));
        }
    }
}

#[test]
fn lengths_follow_the_buffers_not_the_arguments() {
    // read(3, buf, 1 GiB) with a 10-byte buffer: the kernel is told 10.
    let req = Request {
        nr: libc::SYS_read as u64,
        args: [3, 0xdead_0000, 1 << 30, 0, 0, 0],
        slots: vec![Slot::Out(10)],
    };
    let mut c = Call::prepare(req, &[A::Fd, A::Out(2), A::V], &Fake).unwrap();
    let a = c.host_args();
    assert_eq!(a[0], 103);
    assert_eq!(a[2], 10);
    assert_eq!(c.verify(&a), Ok(()));
    // A path without its NUL gets one; a fixed struct is exactly its size.
    let req = Request {
        nr: libc::SYS_newfstatat as u64,
        args: [libc::AT_FDCWD as u32 as u64, 1, 2, 0, 0, 0],
        slots: vec![Slot::In(b"abc".to_vec()), Slot::Out(3)],
    };
    let base = &[A::DirFd, A::Path, A::SOut(144), A::V];
    let mut c = Call::prepare(req, base, &Fake).unwrap();
    let a = c.host_args();
    assert_eq!(c.verify(&a), Ok(()));
    assert_eq!(c.bufs[1].as_deref(), Some(&b"abc\0"[..]));
    assert_eq!(c.bufs[2].as_ref().map(Vec::len), Some(144));
    // A socklen_t larger than the buffer carried is cut to it.
    let req = Request {
        nr: libc::SYS_getsockname as u64,
        args: [3, 1, 2, 0, 0, 0],
        slots: vec![Slot::Out(16), Slot::InOut(1000u32.to_le_bytes().to_vec())],
    };
    let base = &[A::Fd, A::LenOut(2), A::SInOut(4)];
    let mut c = Call::prepare(req, base, &Fake).unwrap();
    let a = c.host_args();
    assert_eq!(c.bufs[2].as_deref(), Some(&16u32.to_le_bytes()[..]));
    assert_eq!(c.verify(&a), Ok(()));
}

#[test]
fn a_verify_catches_a_length_past_its_buffer() {
    let req = Request {
        nr: libc::SYS_write as u64,
        args: [1, 0, 5, 0, 0, 0],
        slots: vec![Slot::In(b"hello".to_vec())],
    };
    let mut c = Call::prepare(req, &[A::Fd, A::In(2), A::V], &Fake).unwrap();
    let mut a = c.host_args();
    assert_eq!(c.verify(&a), Ok(()));
    a[2] = 6;
    assert!(c.verify(&a).is_err());
}

#[test]
fn a_semaphore_array_must_hold_the_whole_set() {
    // SAFETY: plain SysV calls on a private set this test owns.
    let id = unsafe { libc::semget(libc::IPC_PRIVATE, 3, libc::IPC_CREAT | 0o600) };
    assert!(id >= 0);
    let getall = |claimed: u64| {
        let req = Request {
            nr: libc::SYS_semctl as u64,
            args: [id as u64, 0, libc::GETALL as u64, 1, claimed, 0],
            slots: vec![Slot::Out(2 * claimed as usize)],
        };
        let mut c = Call::prepare(req, &[A::V, A::V, A::V, A::V], &Fake).unwrap();
        let r = c.run();
        (r, c.bufs[3].as_ref().map_or(0, Vec::len))
    };
    // A request claiming one semaphore cannot make the kernel write three.
    assert_eq!(getall(1), (-(libc::EINVAL as i64), 2));
    assert_eq!(getall(3), (0, 6));
    // SAFETY: removes the set made above.
    unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
}
