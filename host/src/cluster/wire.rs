//! The bytes nodes exchange through Redis: events for a room's owner (`in` channel),
//! deliveries from the owner (`out` channel), presence entries and stored snapshots.
//!
//! A small hand-written format (tags, little-endian integers, length-prefixed bytes):
//! nothing else in the host needs serde for binary data, and the hot path (one
//! message in, one delivery out) encodes a payload with one copy.

use std::sync::Arc;

use crate::types::CloseReason;
use bytes::{BufMut, Bytes};

use crate::plugin::{MemberId, MemberInfo, Payload};

/// Bumped when the format changes; a record of another version is refused.
pub const VERSION: u8 = 3;

/// A record that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("record truncated")]
    Truncated,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("unknown tag {0}")]
    Tag(u8),
    #[error("text is not UTF-8")]
    Utf8,
    #[error("unknown close reason")]
    Reason,
}

/// An event for a room's owner, published on the room's `in` channel by the node
/// where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToOwner {
    /// The node that published it (where the member lives).
    pub node: String,
    pub event: InEvent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InEvent {
    /// A member joins; `since` is the recovery position it asked from (epoch, offset).
    Join {
        info: MemberInfo,
        since: Option<(String, u64)>,
    },
    /// `reason` is a [`crate::types::CloseReason`] label.
    Leave {
        member: MemberId,
        reason: CloseReason,
    },
    Message {
        from: MemberId,
        payload: Payload,
    },
    Forward {
        from_room: String,
        payload: Payload,
        hops: u8,
    },
    /// A backend published to the room through another node's admin API.
    Publish(Payload),
}

/// What the owner tells every node with members in the room, on the `out` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromOwner {
    /// The owner that published it.
    pub node: String,
    pub event: OutEvent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutEvent {
    /// The deliveries one event produced, in order. `term` is the owner's lease term
    /// (a follower drops batches of an earlier term than one it has seen: their owner
    /// lost the room); `seq` counts batches per owner and room, so a follower notices
    /// batches it missed.
    Deliveries { term: u64, seq: u64, items: Vec<Delivery> },
    /// The owner gave the room up (its last local member left, or it shuts down):
    /// claim it now instead of waiting for the lease to expire.
    Released,
}

/// One thing for the local members of each node to receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// To every member except `except`; `offset` is its place in the room's history,
    /// when the room keeps one.
    Broadcast { payload: Payload, except: Vec<MemberId>, offset: Option<u64> },
    /// To one member.
    Send { to: MemberId, payload: Payload },
    /// Close one member; `failure` says the plugin failed (1011) rather than chose to.
    Close { member: MemberId, code: u16, reason: String, failure: bool },
    /// The room's plugin added one member to another room (`add-to-room`).
    Invite { member: MemberId, room: String, params: Option<String> },
    /// The room's plugin decided a member's join: admitted (`refused` is `None`), with
    /// the room's history position, whether its `since` was served, and the frames it
    /// missed; or refused with a status and reason. Until this arrives, the member's
    /// node delivers nothing of the room to it.
    Admit {
        member: MemberId,
        refused: Option<(u16, String)>,
        position: Option<(String, u64)>,
        recovered: Option<bool>,
        replay: Vec<Bytes>,
    },
}

/// A room's plugin state as its owner stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The plugin that made it; another plugin starts fresh.
    pub plugin: String,
    /// The members the state knows of, in join order.
    pub members: Vec<MemberId>,
    /// `None`: the plugin keeps no state it can hand over.
    pub state: Option<Vec<u8>>,
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(tag: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.put_u8(VERSION);
        buf.put_u8(tag);
        Self(buf)
    }
    fn u8(&mut self, v: u8) {
        self.0.put_u8(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.put_u16_le(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.put_u64_le(v);
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.put_u32_le(v.len() as u32);
        self.0.put_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn payload(&mut self, p: &Payload) {
        self.u8(matches!(p, Payload::Binary(_)) as u8);
        self.bytes(p.as_bytes());
    }
    fn ids(&mut self, ids: &[MemberId]) {
        self.0.put_u32_le(ids.len() as u32);
        for id in ids {
            self.u64(*id);
        }
    }
    fn finish(self) -> Vec<u8> {
        self.0
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Check the version and return the tag.
    fn open(data: &'a [u8]) -> Result<(Self, u8), WireError> {
        let mut r = Reader(data);
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let tag = r.u8()?;
        Ok((r, tag))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, WireError> {
        std::str::from_utf8(self.bytes()?).map(str::to_owned).map_err(|_| WireError::Utf8)
    }
    fn payload(&mut self) -> Result<Payload, WireError> {
        let binary = self.u8()? != 0;
        let data = Bytes::copy_from_slice(self.bytes()?);
        if binary {
            Ok(Payload::Binary(data))
        } else {
            // Text stays text only when it is UTF-8 (a `Payload::Text` guarantees it).
            std::str::from_utf8(&data).map_err(|_| WireError::Utf8)?;
            Ok(Payload::Text(data))
        }
    }
    fn ids(&mut self) -> Result<Vec<MemberId>, WireError> {
        let n = self.u32()? as usize;
        if self.0.len() < n.saturating_mul(8) {
            return Err(WireError::Truncated);
        }
        (0..n).map(|_| self.u64()).collect()
    }
}

const IN_JOIN: u8 = 1;
const IN_LEAVE: u8 = 2;
const IN_MESSAGE: u8 = 3;
const IN_FORWARD: u8 = 4;
const IN_PUBLISH: u8 = 5;
const OUT_DELIVERIES: u8 = 10;
const OUT_RELEASED: u8 = 11;
const DELIVERY_BROADCAST: u8 = 1;
const DELIVERY_SEND: u8 = 2;
const DELIVERY_CLOSE: u8 = 3;
const DELIVERY_INVITE: u8 = 4;
const DELIVERY_ADMIT: u8 = 5;
const MEMBER: u8 = 20;
const SNAPSHOT: u8 = 21;

fn put_option(w: &mut Writer, value: Option<&str>) {
    match value {
        Some(value) => {
            w.u8(1);
            w.str(value);
        }
        None => w.u8(0),
    }
}

fn get_option(r: &mut Reader<'_>) -> Result<Option<String>, WireError> {
    Ok(if r.u8()? != 0 { Some(r.string()?) } else { None })
}

fn put_member(w: &mut Writer, m: &MemberInfo) {
    w.u64(m.id);
    w.str(&m.query);
    w.str(&m.remote_addr);
    put_option(w, m.protocol.as_deref());
    put_option(w, m.identity.as_deref());
    put_option(w, m.params.as_deref());
}

fn get_member(r: &mut Reader<'_>) -> Result<MemberInfo, WireError> {
    let id = r.u64()?;
    let query = r.string()?;
    let remote_addr = r.string()?;
    let protocol = get_option(r)?;
    let identity = get_option(r)?.map(Arc::from);
    let params = get_option(r)?.map(Arc::from);
    Ok(MemberInfo { id, query, remote_addr, protocol, identity, params })
}

/// The node that published a [`ToOwner`] or [`FromOwner`] record, read from its
/// head without decoding the rest.
pub fn publisher(data: &[u8]) -> Option<&[u8]> {
    let (mut r, _) = Reader::open(data).ok()?;
    r.bytes().ok()
}

impl ToOwner {
    pub fn encode(&self) -> Vec<u8> {
        let tag = match &self.event {
            InEvent::Join { .. } => IN_JOIN,
            InEvent::Leave { .. } => IN_LEAVE,
            InEvent::Message { .. } => IN_MESSAGE,
            InEvent::Forward { .. } => IN_FORWARD,
            InEvent::Publish(_) => IN_PUBLISH,
        };
        let mut w = Writer::new(tag);
        w.str(&self.node);
        match &self.event {
            InEvent::Join { info, since } => {
                put_member(&mut w, info);
                match since {
                    Some((epoch, offset)) => {
                        w.u8(1);
                        w.str(epoch);
                        w.u64(*offset);
                    }
                    None => w.u8(0),
                }
            }
            InEvent::Leave { member, reason } => {
                w.u64(*member);
                w.u8(reason.index());
            }
            InEvent::Message { from, payload } => {
                w.u64(*from);
                w.payload(payload);
            }
            InEvent::Forward { from_room, payload, hops } => {
                w.str(from_room);
                w.payload(payload);
                w.u8(*hops);
            }
            InEvent::Publish(payload) => w.payload(payload),
        }
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        let (mut r, tag) = Reader::open(data)?;
        let node = r.string()?;
        let event = match tag {
            IN_JOIN => {
                let info = get_member(&mut r)?;
                let since = if r.u8()? != 0 { Some((r.string()?, r.u64()?)) } else { None };
                InEvent::Join { info, since }
            }
            IN_LEAVE => InEvent::Leave {
                member: r.u64()?,
                reason: CloseReason::from_index(r.u8()?).ok_or(WireError::Reason)?,
            },
            IN_MESSAGE => InEvent::Message { from: r.u64()?, payload: r.payload()? },
            IN_FORWARD => InEvent::Forward { from_room: r.string()?, payload: r.payload()?, hops: r.u8()? },
            IN_PUBLISH => InEvent::Publish(r.payload()?),
            other => return Err(WireError::Tag(other)),
        };
        Ok(Self { node, event })
    }
}

impl FromOwner {
    pub fn encode(&self) -> Vec<u8> {
        let tag = match &self.event {
            OutEvent::Deliveries { .. } => OUT_DELIVERIES,
            OutEvent::Released => OUT_RELEASED,
        };
        let mut w = Writer::new(tag);
        w.str(&self.node);
        if let OutEvent::Deliveries { term, seq, items } = &self.event {
            w.u64(*term);
            w.u64(*seq);
            w.0.put_u32_le(items.len() as u32);
            for item in items {
                match item {
                    Delivery::Broadcast { payload, except, offset } => {
                        w.u8(DELIVERY_BROADCAST);
                        w.payload(payload);
                        w.ids(except);
                        w.u64(offset.unwrap_or(0));
                    }
                    Delivery::Send { to, payload } => {
                        w.u8(DELIVERY_SEND);
                        w.u64(*to);
                        w.payload(payload);
                    }
                    Delivery::Close { member, code, reason, failure } => {
                        w.u8(DELIVERY_CLOSE);
                        w.u64(*member);
                        w.u16(*code);
                        w.str(reason);
                        w.u8(*failure as u8);
                    }
                    Delivery::Invite { member, room, params } => {
                        w.u8(DELIVERY_INVITE);
                        w.u64(*member);
                        w.str(room);
                        put_option(&mut w, params.as_deref());
                    }
                    Delivery::Admit { member, refused, position, recovered, replay } => {
                        w.u8(DELIVERY_ADMIT);
                        w.u64(*member);
                        match refused {
                            Some((status, reason)) => {
                                w.u8(1);
                                w.u16(*status);
                                w.str(reason);
                            }
                            None => w.u8(0),
                        }
                        match position {
                            Some((epoch, offset)) => {
                                w.u8(1);
                                w.str(epoch);
                                w.u64(*offset);
                            }
                            None => w.u8(0),
                        }
                        w.u8(match recovered {
                            None => 0,
                            Some(false) => 1,
                            Some(true) => 2,
                        });
                        w.0.put_u32_le(replay.len() as u32);
                        for frame in replay {
                            w.bytes(frame);
                        }
                    }
                }
            }
        }
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        let (mut r, tag) = Reader::open(data)?;
        let node = r.string()?;
        let event = match tag {
            OUT_DELIVERIES => {
                let term = r.u64()?;
                let seq = r.u64()?;
                let n = r.u32()? as usize;
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(match r.u8()? {
                        DELIVERY_BROADCAST => Delivery::Broadcast {
                            payload: r.payload()?,
                            except: r.ids()?,
                            offset: Some(r.u64()?).filter(|offset| *offset > 0),
                        },
                        DELIVERY_SEND => Delivery::Send { to: r.u64()?, payload: r.payload()? },
                        DELIVERY_CLOSE => Delivery::Close {
                            member: r.u64()?,
                            code: r.u16()?,
                            reason: r.string()?,
                            failure: r.u8()? != 0,
                        },
                        DELIVERY_INVITE => Delivery::Invite {
                            member: r.u64()?,
                            room: r.string()?,
                            params: get_option(&mut r)?,
                        },
                        DELIVERY_ADMIT => {
                            let member = r.u64()?;
                            let refused = if r.u8()? != 0 { Some((r.u16()?, r.string()?)) } else { None };
                            let position = if r.u8()? != 0 { Some((r.string()?, r.u64()?)) } else { None };
                            let recovered = match r.u8()? {
                                0 => None,
                                1 => Some(false),
                                _ => Some(true),
                            };
                            let n = r.u32()? as usize;
                            let mut replay = Vec::with_capacity(n.min(1024));
                            for _ in 0..n {
                                replay.push(Bytes::copy_from_slice(r.bytes()?));
                            }
                            Delivery::Admit { member, refused, position, recovered, replay }
                        }
                        other => return Err(WireError::Tag(other)),
                    });
                }
                OutEvent::Deliveries { term, seq, items }
            }
            OUT_RELEASED => OutEvent::Released,
            other => return Err(WireError::Tag(other)),
        };
        Ok(Self { node, event })
    }
}

/// A presence entry: what the owner needs to present a member to its plugin.
pub fn encode_member(member: &MemberInfo) -> Vec<u8> {
    let mut w = Writer::new(MEMBER);
    put_member(&mut w, member);
    w.finish()
}

pub fn decode_member(data: &[u8]) -> Result<MemberInfo, WireError> {
    let (mut r, tag) = Reader::open(data)?;
    if tag != MEMBER {
        return Err(WireError::Tag(tag));
    }
    get_member(&mut r)
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(SNAPSHOT);
        w.str(&self.plugin);
        w.ids(&self.members);
        match &self.state {
            Some(state) => {
                w.u8(1);
                w.bytes(state);
            }
            None => w.u8(0),
        }
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        let (mut r, tag) = Reader::open(data)?;
        if tag != SNAPSHOT {
            return Err(WireError::Tag(tag));
        }
        let plugin = r.string()?;
        let members = r.ids()?;
        let state = if r.u8()? != 0 { Some(r.bytes()?.to_vec()) } else { None };
        Ok(Self { plugin, members, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64) -> MemberInfo {
        MemberInfo {
            id,
            query: "token=a".into(),
            remote_addr: "127.0.0.1:5".into(),
            protocol: Some("chat.v1".into()),
            identity: Some(Arc::from(r#"{"sub":"42"}"#)),
            params: None,
        }
    }

    #[test]
    fn inbound_round_trips() {
        let events = [
            InEvent::Join { info: member(7), since: None },
            InEvent::Join { info: MemberInfo { protocol: None, ..member(8) }, since: Some(("e1".into(), 9)) },
            InEvent::Leave { member: 7, reason: CloseReason::Client },
            InEvent::Message { from: 7, payload: Payload::text("héllo") },
            InEvent::Message { from: 7, payload: Payload::binary(vec![0, 255]) },
            InEvent::Forward { from_room: "a:b".into(), payload: Payload::text("x"), hops: 3 },
            InEvent::Publish(Payload::binary(Vec::new())),
        ];
        for event in events {
            let record = ToOwner { node: "n1".into(), event };
            assert_eq!(publisher(&record.encode()), Some(&b"n1"[..]));
            assert_eq!(ToOwner::decode(&record.encode()).unwrap(), record);
        }
    }

    #[test]
    fn outbound_round_trips() {
        let record = FromOwner {
            node: "owner".into(),
            event: OutEvent::Deliveries {
                term: 1_733_340_000_000_001,
                seq: 42,
                items: vec![
                    Delivery::Broadcast { payload: Payload::text("hi"), except: vec![1, 2], offset: None },
                    Delivery::Broadcast { payload: Payload::text("ho"), except: vec![], offset: Some(7) },
                    Delivery::Send { to: 9, payload: Payload::binary(vec![1]) },
                    Delivery::Close { member: 9, code: 4000, reason: "bye".into(), failure: false },
                    Delivery::Invite {
                        member: 9,
                        room: "match:1".into(),
                        params: Some(r#"{"seat":2}"#.into()),
                    },
                    Delivery::Admit {
                        member: 9,
                        refused: None,
                        position: Some(("e1".into(), 7)),
                        recovered: Some(true),
                        replay: vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")],
                    },
                    Delivery::Admit {
                        member: 10,
                        refused: Some((403, "no".into())),
                        position: None,
                        recovered: None,
                        replay: vec![],
                    },
                ],
            },
        };
        assert_eq!(FromOwner::decode(&record.encode()).unwrap(), record);
        assert_eq!(publisher(&record.encode()), Some(&b"owner"[..]));
        assert_eq!(publisher(&[VERSION]), None);
        let released = FromOwner { node: "owner".into(), event: OutEvent::Released };
        assert_eq!(FromOwner::decode(&released.encode()).unwrap(), released);
    }

    #[test]
    fn snapshots_and_members_round_trip() {
        let snapshot = Snapshot { plugin: "counter".into(), members: vec![1, 5], state: Some(vec![3; 8]) };
        assert_eq!(Snapshot::decode(&snapshot.encode()).unwrap(), snapshot);
        let stateless = Snapshot { state: None, ..snapshot };
        assert_eq!(Snapshot::decode(&stateless.encode()).unwrap(), stateless);
        assert_eq!(decode_member(&encode_member(&member(3))).unwrap(), member(3));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(ToOwner::decode(&[]), Err(WireError::Truncated));
        assert_eq!(ToOwner::decode(&[9, 1]), Err(WireError::Version(9)));
        let mut record = ToOwner { node: "n".into(), event: InEvent::Publish(Payload::text("abc")) }.encode();
        record.truncate(record.len() - 1);
        assert_eq!(ToOwner::decode(&record), Err(WireError::Truncated));
        // Text that is not UTF-8 is refused rather than passed on as text.
        let bad =
            ToOwner { node: "n".into(), event: InEvent::Publish(Payload::Text(Bytes::from_static(b"\xff"))) };
        assert_eq!(ToOwner::decode(&bad.encode()), Err(WireError::Utf8));
        assert!(FromOwner::decode(&[VERSION, 99]).is_err());
    }
}
