//! Tests of a room's actor against real wasmtime and the real `chaos` plugin: the
//! failure recovery that end-to-end tests otherwise reach only through a socket.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::task::TaskTracker;

use super::*;
use crate::plugin::HostCaps;
use crate::plugin::tests::plugin_file;

/// A plugins folder holding the built `chaos.wasm`, removed when dropped.
struct Folder(PathBuf);

impl Folder {
    fn with_chaos(label: &str) -> Folder {
        let dir = std::env::temp_dir().join(format!("roomcast-room-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        std::fs::copy(plugin_file("chaos"), dir.join("chaos.wasm")).expect("copy chaos.wasm");
        Folder(dir)
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rooms(folder: &Folder) -> Arc<Rooms> {
    let metrics = Arc::new(Metrics::default());
    let plugins =
        LivePlugins::load(Some(&folder.0), HostCaps::default(), None, metrics.clone()).expect("load");
    Arc::new(Rooms::new(metrics, Arc::new(plugins), TaskTracker::new()))
}

fn peer(id: MemberId) -> Arc<Peer> {
    Arc::new(Peer::new(id, 1 << 20, String::new(), "127.0.0.1:1".into(), None, None, None))
}

/// The payload of the next data frame queued for `peer` (a server frame: no mask),
/// waiting up to 10 s for it.
async fn next_text(peer: &Peer) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut batch: Vec<Bytes> = Vec::new();
        peer.outbound.drain(&mut batch, 1);
        if let Some(frame) = batch.pop() {
            let (len, at) = match frame[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
                len => (usize::from(len), 2),
            };
            return String::from_utf8(frame[at..at + len].to_vec()).expect("text frame");
        }
        assert!(tokio::time::Instant::now() < deadline, "no frame for member {} within 10 s", peer.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_costs_the_instance_and_the_room_goes_on_with_every_member() {
    let folder = Folder::with_chaos("trap");
    let rooms = rooms(&folder);
    let (ada, bob) = (peer(1), peer(2));
    let room = rooms.join("chaos", Joining::plain(&ada)).await;
    rooms.join("chaos", Joining::plain(&bob)).await;

    room.send(ada.id, Payload::text("panic")).await;
    // The fresh instance was told about both members: it lists them.
    room.send(ada.id, Payload::text("members")).await;
    let members: Vec<MemberId> = serde_json::from_str(&next_text(&ada).await).expect("a JSON list");
    assert_eq!(members, [1, 2]);
    assert_eq!((ada.ending(), bob.ending()), (None, None), "nobody is closed by a recovered failure");
    // And it serves as before: a plain message passes to the other member.
    room.send(ada.id, Payload::text("hello")).await;
    assert_eq!(next_text(&bob).await, "hello");
    assert_eq!(room.plugin().map(|(name, _)| name), Some("chaos".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_call_is_stopped_and_its_timers_are_gone_with_its_instance() {
    let folder = Folder::with_chaos("spin");
    let rooms = rooms(&folder);
    let ada = peer(1);
    let room = rooms.join("chaos", Joining::plain(&ada)).await;
    // A timer set by the instance that is about to fail must not fire on the next one.
    room.send(ada.id, Payload::text("timer:200")).await;
    room.send(ada.id, Payload::text("spin")).await;
    room.send(ada.id, Payload::text("timer:50")).await;
    assert_eq!(next_text(&ada).await, "timer fired");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut batch = Vec::new();
    ada.outbound.drain(&mut batch, 8);
    assert!(batch.is_empty(), "the failed instance's timer fired: {batch:?}");
    assert_eq!(ada.ending(), None);
}

#[test]
fn pending_invites_are_bounded() {
    let peer = peer(1);
    for n in 0..super::peer::MAX_PENDING_INVITES + 10 {
        peer.invite(Invite { room: format!("r{n}"), params: None });
    }
    let invites = peer.take_invites();
    assert_eq!(invites.len(), super::peer::MAX_PENDING_INVITES);
    assert_eq!(invites.first().map(|i| i.room.as_str()), Some("r0"), "the first ones are kept, in order");
    assert!(peer.take_invites().is_empty());
}

#[test]
fn a_tagged_frame_gives_back_its_payload() {
    for text in ["", "hé \"quoted\"", &"x".repeat(200), &"y".repeat(70_000)] {
        let payload = Payload::text(text.to_owned());
        assert_eq!(
            super::peer::untag(&super::peer::encode_tagged("room:1", &payload, Some(7))),
            Some(payload)
        );
    }
    let binary = Payload::binary(vec![1, 2, 3]);
    assert_eq!(super::peer::untag(&super::peer::encode_tagged("room:1", &binary, None)), Some(binary));
    assert_eq!(super::peer::untag(&Bytes::from_static(b"\x81\x05ab")), None, "a short frame");
    assert_eq!(super::peer::untag(&crate::ws::frame::encode(crate::ws::frame::OP_TEXT, b"not json")), None);
}

/// Two members' messages that are ready at once reach a large room as one batch, even
/// though the first sender's task wakes the room's actor and tokio runs a task woken
/// that way ahead of every other ready one (the "LIFO slot"): the actor lets the second
/// message arrive before it sends the first on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn messages_ready_together_reach_a_large_room_as_one_batch() {
    let metrics = Arc::new(Metrics::default());
    let plugins = LivePlugins::load(None, HostCaps::default(), None, metrics.clone()).expect("no plugins");
    let rooms = Arc::new(Rooms::new(metrics.clone(), Arc::new(plugins), TaskTracker::new()));
    let peers: Vec<Arc<Peer>> = (1..=super::actor::GATHER_MEMBERS as MemberId).map(peer).collect();
    let mut room = None;
    for peer in &peers {
        room = Some(rooms.join("big", Joining::plain(peer)).await);
    }
    let room = room.expect("a room");
    // Once a first message went round, every join was handled and the actor waits
    // on an empty inbox.
    room.send(peers[0].id, Payload::text("warm")).await;
    assert_eq!(next_text(&peers[2]).await, "warm");
    let (batched, out) = (metrics.messages_batched.load(Relaxed), metrics.messages_out.load(Relaxed));

    // One task on the runtime's one worker starts both senders: the first one's send
    // wakes the actor while the second is ready to run.
    let (a, b) = (peers[0].id, peers[1].id);
    let sending = room.clone();
    tokio::spawn(async move {
        let first = tokio::spawn({
            let room = sending.clone();
            async move { room.send(a, Payload::text("first")).await }
        });
        let second = tokio::spawn(async move { sending.send(b, Payload::text("second")).await });
        let _ = (first.await, second.await);
    })
    .await
    .expect("senders");

    // A third member hears both (in the order the runtime ran the senders).
    let mut heard = [next_text(&peers[2]).await, next_text(&peers[2]).await];
    heard.sort();
    assert_eq!(heard, ["first", "second"]);
    assert_eq!(
        metrics.messages_batched.load(Relaxed) - batched,
        2,
        "both messages were handled as one batch"
    );
    assert_eq!(metrics.messages_out.load(Relaxed) - out, 2 * (peers.len() as u64 - 1));
}

/// A message that arrives while a large room is half-way through writing the previous
/// one rides along with it for the members not yet written to, instead of waiting for
/// a pass of its own: a late member gets both with one push while an early one has
/// only the first, and then every member has both, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_message_that_arrives_mid_pass_rides_along_for_the_members_not_yet_written() {
    let metrics = Arc::new(Metrics::default());
    let plugins = LivePlugins::load(None, HostCaps::default(), None, metrics.clone()).expect("no plugins");
    let rooms = Arc::new(Rooms::new(metrics.clone(), Arc::new(plugins), TaskTracker::new()));
    // Three slices of members.
    let members = 2 * super::actor::PASS_SLICE + 44;
    let peers: Vec<Arc<Peer>> = (1..=members as MemberId).map(peer).collect();
    let mut room = None;
    for peer in &peers {
        room = Some(rooms.join("big", Joining::plain(peer)).await);
    }
    let room = room.expect("a room");
    room.send(peers[0].id, Payload::text("warm")).await;
    let last = peers.last().expect("members").clone();
    for peer in &peers[1..] {
        assert_eq!(next_text(peer).await, "warm");
    }

    // One task on the runtime's one worker: it sends the first message, waits (giving
    // the actor the worker) until the first slice of members has it, sends the second,
    // then waits until the last member has something.
    let (early, late) = (peers[1].clone(), last.clone());
    let (sender, sending) = (peers[0].id, room.clone());
    let seen = tokio::spawn(async move {
        sending.send(sender, Payload::text("first")).await;
        while early.outbound.queued_bytes() == 0 {
            tokio::task::yield_now().await;
        }
        sending.send(sender, Payload::text("second")).await;
        while late.outbound.queued_bytes() == 0 {
            tokio::task::yield_now().await;
        }
        (early.outbound.queued_bytes(), late.outbound.queued_bytes())
    })
    .await
    .expect("sender");
    // A text frame of n < 126 bytes is n + 2 bytes.
    let (first, both) = ("first".len() + 2, "first".len() + 2 + "second".len() + 2);
    assert_eq!(seen, (first, both), "the late member got both at once, the early one only the first");
    for peer in &peers[1..] {
        assert_eq!([next_text(peer).await, next_text(peer).await], ["first", "second"], "member {}", peer.id);
    }
    assert_eq!(metrics.messages_batched.load(Relaxed), 2, "both messages went in one pass");
}
