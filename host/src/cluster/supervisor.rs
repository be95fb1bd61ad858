//! The cluster's tasks: the writer (queued writes in pipelines), the dispatcher
//! (subscription messages to room entries) and the supervisor (connection, heartbeat,
//! leases, role decisions).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use futures_util::StreamExt as _;
use redis::Value;
use redis::aio::PubSubStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::plugin::MemberInfo;

/// Why the supervisor gave up on its connection to Redis (it reconnects and
/// resynchronises).
#[derive(Debug, thiserror::Error)]
pub(super) enum RedisFailure {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the subscription connection closed")]
    SubscriptionClosed,
    #[error("a write failed")]
    WriteFailed,
    #[error("not connected")]
    NotConnected,
    #[error("unexpected heartbeat reply `{0}`")]
    Reply(String),
}

impl Cluster {
    /// The writer: drain the queue in pipelines, in order, over one connection.
    pub(super) async fn write_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Write>) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        loop {
            if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
                return;
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let mut flushes = Vec::new();
            // Per command: the room and record to hand back if nobody hears it.
            let mut unheard = Vec::new();
            for write in batch.drain(..) {
                match write {
                    Write::Cmd(cmd) => {
                        pipe.add_command(cmd);
                        unheard.push(None);
                    }
                    Write::Publish { channel, data, unheard: room } => {
                        pipe.cmd("PUBLISH").arg(channel).arg(&data);
                        unheard.push(room.map(|room| (room, data)));
                    }
                    Write::Flush(done) => flushes.push(done),
                }
            }
            if !unheard.is_empty() {
                let conn = if self.is_up() { self.conn.lock().expect("cluster lock").clone() } else { None };
                let failed = match conn {
                    None => true,
                    Some(mut conn) => {
                        let sent = pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn);
                        match tokio::time::timeout(self.op_timeout(), sent).await {
                            Ok(Ok(replies)) => {
                                for (reply, keep) in replies.into_iter().zip(unheard.iter_mut()) {
                                    if let (Ok(Value::Int(0)), Some((room, data))) = (reply, keep.take()) {
                                        self.hand_back(&room, data);
                                    }
                                }
                                false
                            }
                            Ok(Err(error)) => {
                                tracing::warn!(%error, "Redis write failed");
                                self.write_failed.notify_one();
                                true
                            }
                            Err(_) => {
                                tracing::warn!("Redis write timed out");
                                self.write_failed.notify_one();
                                true
                            }
                        }
                    }
                };
                if failed {
                    // Events for an owner go back to their room, which runs them itself
                    // once it is alone; everything else is lost and counted.
                    let mut lost = unheard.len() as u64;
                    for (room, data) in unheard.into_iter().flatten() {
                        lost -= 1;
                        self.hand_back(&room, data);
                    }
                    self.stats.dropped_redis.fetch_add(lost, Relaxed);
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// An event published for a room's owner reached nobody: give it back to the room
    /// and re-decide its role now.
    fn hand_back(&self, room: &str, data: Vec<u8>) {
        let entry = self.entries.lock().expect("cluster lock").get(room).cloned();
        let Some(entry) = entry else {
            self.stats.dropped_unheard.fetch_add(1, Relaxed);
            return;
        };
        let size = data.len();
        if !entry.push_record(Record::Unheard(data), size) {
            self.stats.dropped_inbox.fetch_add(1, Relaxed);
        }
        self.check(entry);
    }

    /// Re-decide a room's role soon (at most one request queued per room).
    pub(super) fn check(&self, entry: Arc<Entry>) {
        if !entry.checking.swap(true, Relaxed)
            && self.control.try_send(Control::Check(entry.clone())).is_err()
        {
            entry.checking.store(false, Relaxed);
        }
    }

    /// Hand every subscription message to its room's record backlog, until the
    /// connection ends. An owner hears its own deliveries on the `out` channel: they
    /// were delivered here already and are skipped before decoding.
    pub(super) async fn dispatch(self: Arc<Self>, mut stream: PubSubStream) {
        while let Some(message) = stream.next().await {
            let Some((room, direction)) = store::parse_channel(message.get_channel_name()) else {
                continue;
            };
            let data = message.get_payload_bytes();
            if direction == store::Direction::Out && wire::publisher(data) == Some(self.node.as_bytes()) {
                continue;
            }
            let Some(entry) = self.entries.lock().expect("cluster lock").get(room).cloned() else {
                continue;
            };
            let record = match direction {
                store::Direction::In => ToOwner::decode(data).map(Record::In),
                store::Direction::Out => FromOwner::decode(data).map(Record::Out),
            };
            match record {
                Ok(record) => {
                    if !entry.push_record(record, data.len()) {
                        self.stats.dropped_inbox.fetch_add(1, Relaxed);
                    }
                }
                Err(error) => tracing::warn!(%room, %error, "undecodable cluster record ignored"),
            }
        }
    }

    /// Connect, resubscribe, beat, decide roles; on any connection loss go solo, back
    /// off and start again.
    pub(super) async fn supervise(self: Arc<Self>, mut control: mpsc::Receiver<Control>) {
        let mut backoff = MIN_BACKOFF;
        let mut outage: Option<Instant> = None;
        let mut connected_once = false;
        loop {
            let connected = tokio::select! {
                () = self.stop.cancelled() => return,
                connected = self.connect() => connected,
            };
            let (conn, sink, stream) = match connected {
                Ok(conns) => conns,
                Err(error) => {
                    if outage.is_none() {
                        tracing::warn!(%error, "Redis is unreachable: every room serves this node's members alone; retrying");
                        outage = Some(Instant::now());
                    }
                    self.go_solo();
                    let wait = tokio::time::sleep(backoff);
                    tokio::pin!(wait);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    loop {
                        tokio::select! {
                            () = self.stop.cancelled() => return,
                            () = &mut wait => break,
                            control = control.recv() => match control {
                                Some(control) => self.control_while_down(control),
                                None => return,
                            },
                        }
                    }
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            *self.conn.lock().expect("cluster lock") = Some(conn);
            *self.sink.lock().await = Some(sink);
            let mut dispatcher = tokio::spawn(self.clone().dispatch(stream));
            let entries = self.entries();
            for entry in &entries {
                entry.subscribed_in.store(false, Relaxed);
                entry.resync.store(true, Relaxed);
            }
            self.up.store(true, Relaxed);
            if let Some(since) = outage.take() {
                tracing::info!(down_for = ?since.elapsed(), rooms = entries.len(), "Redis is reachable again: resynchronising");
            }
            if connected_once {
                self.stats.resyncs.fetch_add(1, Relaxed);
            }
            connected_once = true;
            let mut result = self.subscribe_out(&entries).await;
            if result.is_ok() {
                result = self.tick(&entries).await;
            }
            let mut interval = tokio::time::interval(self.lease / 3);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.reset();
            while result.is_ok() {
                result = tokio::select! {
                    () = self.stop.cancelled() => {
                        dispatcher.abort();
                        return;
                    }
                    _ = &mut dispatcher => Err(RedisFailure::SubscriptionClosed),
                    () = self.write_failed.notified() => Err(RedisFailure::WriteFailed),
                    _ = interval.tick() => self.tick(&self.entries()).await,
                    next = control.recv() => match next {
                        Some(first) => {
                            let mut rest = control_batch(&mut control);
                            self.control(first, &mut rest).await
                        }
                        None => return,
                    },
                };
            }
            let Err(error) = result else { continue };
            tracing::warn!(%error, "lost the connection to Redis; reconnecting and resynchronising");
            outage = Some(Instant::now());
            dispatcher.abort();
            if !matches!(error, RedisFailure::SubscriptionClosed) {
                self.up.store(false, Relaxed);
                *self.conn.lock().expect("cluster lock") = None;
            }
            // Only the subscription closed (Redis drops a subscriber over its output
            // limit): the commands connection keeps writing (broadcasts go on into the
            // rooms' stored histories, from which other nodes fill their gaps) until the
            // reconnection replaces it.
            *self.sink.lock().await = None;
        }
    }

    /// Every room serves its local members alone until Redis returns.
    fn go_solo(&self) {
        self.up.store(false, Relaxed);
        for entry in self.entries() {
            if entry.set_role(Role::Solo) != Role::Solo {
                entry.push(RoleChange::Solo);
            }
            entry.resync.store(true, Relaxed);
        }
    }

    fn control_while_down(&self, control: Control) {
        match control {
            Control::Attach(entry) => {
                entry.set_role(Role::Solo);
                entry.push(RoleChange::Solo);
            }
            Control::Detach(entry, done) => {
                self.forget(&entry);
                let _ = done.send(());
            }
            Control::Check(entry) => entry.checking.store(false, Relaxed),
            Control::Reconcile(_) => {}
        }
    }

    /// Remove a room that ended on this node from the registry (unless a new room of
    /// the same name replaced it); `true` if its channels are no longer wanted.
    fn forget(&self, entry: &Arc<Entry>) -> bool {
        let mut entries = self.entries.lock().expect("cluster lock");
        match entries.get(&entry.name) {
            Some(current) if Arc::ptr_eq(current, entry) => {
                entries.remove(&entry.name);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    async fn control(&self, first: Control, rest: &mut Vec<Control>) -> Result<(), RedisFailure> {
        let mut attach = Vec::new();
        let mut check = Vec::new();
        for control in std::iter::once(first).chain(rest.drain(..)) {
            match control {
                Control::Attach(entry) => attach.push(entry),
                Control::Check(entry) => {
                    entry.checking.store(false, Relaxed);
                    check.push(entry);
                }
                Control::Detach(entry, done) => {
                    let result = if self.forget(&entry) {
                        let mut channels = vec![store::out_channel(&entry.name)];
                        if entry.subscribed_in.swap(false, Relaxed) {
                            channels.push(store::in_channel(&entry.name));
                        }
                        self.unsubscribe(channels).await
                    } else {
                        Ok(())
                    };
                    let _ = done.send(());
                    result?;
                }
                Control::Reconcile(entry) => {
                    let asked = Instant::now();
                    let presence = self.members(&entry.name).await?;
                    entry.push(RoleChange::Reconcile { presence, asked });
                }
            }
        }
        if !attach.is_empty() {
            self.subscribe_out(&attach).await?;
            self.tick(&attach).await?;
        }
        if !check.is_empty() {
            self.tick(&check).await?;
        }
        Ok(())
    }

    async fn subscribe_out(&self, entries: &[Arc<Entry>]) -> Result<(), RedisFailure> {
        if entries.is_empty() {
            return Ok(());
        }
        let channels: Vec<String> = entries.iter().map(|e| store::out_channel(&e.name)).collect();
        self.subscribe(channels).await
    }

    async fn subscribe(&self, channels: Vec<String>) -> Result<(), RedisFailure> {
        let mut sink = self.sink.lock().await;
        let Some(sink) = sink.as_mut() else { return Err(RedisFailure::NotConnected) };
        for chunk in channels.chunks(1024) {
            tokio::time::timeout(self.op_timeout(), sink.subscribe(chunk))
                .await
                .map_err(|_| RedisFailure::Timeout("SUBSCRIBE"))??;
        }
        Ok(())
    }

    async fn unsubscribe(&self, channels: Vec<String>) -> Result<(), RedisFailure> {
        let mut sink = self.sink.lock().await;
        let Some(sink) = sink.as_mut() else { return Err(RedisFailure::NotConnected) };
        tokio::time::timeout(self.op_timeout(), sink.unsubscribe(channels))
            .await
            .map_err(|_| RedisFailure::Timeout("UNSUBSCRIBE"))?
            .map_err(RedisFailure::from)
    }

    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, RedisFailure> {
        let conn = self.conn.lock().expect("cluster lock").clone();
        let Some(mut conn) = conn else { return Err(RedisFailure::NotConnected) };
        tokio::time::timeout(self.op_timeout(), pipe.query_async::<T>(&mut conn))
            .await
            .map_err(|_| RedisFailure::Timeout("a command"))?
            .map_err(RedisFailure::from)
    }

    /// One heartbeat for `entries`: refresh presence (in full where Redis may have lost
    /// it), renew or inspect each lease, claim vacant ones, and tell rooms whose role
    /// changed.
    async fn tick(&self, entries: &[Arc<Entry>]) -> Result<(), RedisFailure> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(store::node_key(&self.node)).arg(1).arg("PX").arg(self.presence_ms()).ignore();
        let mut ticked = Vec::with_capacity(entries.len());
        for entry in entries {
            if entry.closed.load(Relaxed) {
                continue;
            }
            let name = &entry.name;
            let members_key = store::members_key(name, &self.node);
            if entry.resync.load(Relaxed) {
                // Rewrite this node's presence for the room from the registry.
                pipe.cmd("DEL").arg(&members_key).ignore();
                for member in entry.local_members() {
                    pipe.cmd("HSET")
                        .arg(&members_key)
                        .arg(member.id)
                        .arg(wire::encode_member(&member))
                        .ignore();
                }
            }
            pipe.cmd("EVAL")
                .arg(store::TICK)
                .arg(6)
                .arg(store::owner_key(name))
                .arg(store::state_key(name))
                .arg(store::nodes_key(name))
                .arg(&members_key)
                .arg(store::ROOMS_KEY)
                .arg(store::term_key(name))
                .arg(&self.node)
                .arg(self.lease.as_millis() as u64)
                .arg(self.presence_ms())
                .arg(&**name)
                .arg(store::members_prefix(name))
                .arg(self.state_ms());
            ticked.push(entry.clone());
        }
        let full = entries.len() > 1 || ticked.is_empty();
        if full {
            pipe.cmd("EVAL").arg(store::KNOWN).arg(1).arg(store::ROOMS_KEY);
        }
        // A lease renewed by this tick lasts at least this long: Redis extends it when
        // the script runs, which is after this.
        let sent = Instant::now();
        let mut replies: Vec<Value> = self.query(&pipe).await?;
        if full && let Some(known) = replies.pop() {
            let known: HashSet<String> = array(known).into_iter().map(text).collect();
            *self.known.write().expect("cluster lock") = known;
        }
        let mut to_claim = Vec::new();
        for (entry, reply) in ticked.into_iter().zip(replies) {
            let resync = entry.resync.load(Relaxed);
            let mut fields = array(reply).into_iter();
            let status = fields.next().map(text).unwrap_or_default();
            match status.as_str() {
                "mine" if entry.role() == Role::Owner && !resync => {
                    entry.renewed(sent + self.lease);
                    let mut nodes = Vec::new();
                    while let (Some(node), Some(count)) = (fields.next(), fields.next()) {
                        nodes.push((text(node), int(count)));
                    }
                    entry.push(RoleChange::Nodes(nodes));
                }
                "mine" | "vacant" => to_claim.push(entry),
                "other" => {
                    let owner = fields.next().map(text).unwrap_or_default();
                    self.follow(&entry, owner).await?;
                }
                other => return Err(RedisFailure::Reply(other.to_owned())),
            }
        }
        if !to_claim.is_empty() {
            self.claim(&to_claim).await?;
        }
        Ok(())
    }

    /// Another node owns the room.
    async fn follow(&self, entry: &Arc<Entry>, owner: String) -> Result<(), RedisFailure> {
        let resync = entry.resync.swap(false, Relaxed);
        if entry.subscribed_in.swap(false, Relaxed) {
            self.unsubscribe(vec![store::in_channel(&entry.name)]).await?;
        }
        let before = entry.set_role(Role::Follower);
        if before != Role::Follower || resync {
            entry.push(RoleChange::Follower { owner });
        }
        Ok(())
    }

    /// Take the leases of `entries` (vacant, or ours while the room does not know):
    /// subscribe to their `in` channels first, then claim, read the stored snapshot and
    /// every node's members.
    async fn claim(&self, entries: &[Arc<Entry>]) -> Result<(), RedisFailure> {
        let channels: Vec<String> = entries
            .iter()
            .filter(|e| !e.subscribed_in.swap(true, Relaxed))
            .map(|e| store::in_channel(&e.name))
            .collect();
        if !channels.is_empty() {
            self.subscribe(channels).await?;
        }
        let asked = Instant::now();
        let mut pipe = redis::pipe();
        for entry in entries {
            let name = &entry.name;
            pipe.cmd("EVAL")
                .arg(store::CLAIM)
                .arg(2)
                .arg(store::owner_key(name))
                .arg(store::term_key(name))
                .arg(&self.node)
                .arg(self.lease.as_millis() as u64)
                .arg(self.state_ms());
            pipe.cmd("GET").arg(store::state_key(name));
            members_cmd(&mut pipe, name);
            store::read_history_cmd(&mut pipe, name);
            pipe.cmd("TIME");
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        let mut replies = replies.into_iter();
        for entry in entries {
            let (Some(claim), Some(state), Some(members), Some(history), Some(now)) =
                (replies.next(), replies.next(), replies.next(), replies.next(), replies.next())
            else {
                return Err(RedisFailure::Reply("a short reply to a claim".to_owned()));
            };
            let mut fields = array(claim).into_iter();
            let status = fields.next().map(text).unwrap_or_default();
            if status == "other" {
                let owner = fields.next().map(text).unwrap_or_default();
                self.follow(entry, owner).await?;
                continue;
            }
            let term = fields.next().map(text).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
            entry.resync.store(false, Relaxed);
            let snapshot = match state {
                Value::BulkString(data) => match Snapshot::decode(&data) {
                    Ok(snapshot) => Some(snapshot),
                    Err(error) => {
                        tracing::warn!(room = %entry.name, %error, "stored snapshot unreadable; ignoring it");
                        None
                    }
                },
                _ => None,
            };
            if status == "claimed" {
                self.stats.takeovers.fetch_add(1, Relaxed);
                tracing::debug!(room = %entry.name, restored = snapshot.is_some(), "took the room's lease");
            }
            entry.term.store(term, Relaxed);
            entry.renewed(asked + self.lease);
            entry.set_role(Role::Owner);
            let history = stored_history(history, now);
            entry.push(RoleChange::Owner { snapshot, presence: presence(members), asked, history });
        }
        Ok(())
    }

    /// Every live node's members of `room`.
    async fn members(&self, room: &str) -> Result<Vec<(String, MemberInfo)>, RedisFailure> {
        let mut pipe = redis::pipe();
        members_cmd(&mut pipe, room);
        let mut replies: Vec<Value> = self.query(&pipe).await?;
        Ok(presence(replies.pop().unwrap_or(Value::Nil)))
    }

    /// The rooms live on this node, at this moment.
    fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries.lock().expect("cluster lock").values().cloned().collect()
    }
}

/// Add a `MEMBERS` read of `room` (every live node's members) to `pipe`.
fn members_cmd(pipe: &mut redis::Pipeline, room: &str) {
    pipe.cmd("EVAL").arg(store::MEMBERS).arg(1).arg(store::nodes_key(room)).arg(store::members_prefix(room));
}

/// Drain further control messages that are already queued, to batch them.
fn control_batch(control: &mut mpsc::Receiver<Control>) -> Vec<Control> {
    let mut rest = Vec::new();
    while rest.len() < 1024 {
        match control.try_recv() {
            Ok(c) => rest.push(c),
            Err(_) => break,
        }
    }
    rest
}

/// Parse a `MEMBERS` reply.
pub(super) fn presence(value: Value) -> Vec<(String, MemberInfo)> {
    let mut out = Vec::new();
    let mut items = array(value).into_iter();
    while let (Some(node), Some(entries)) = (items.next(), items.next()) {
        let node = text(node);
        for entry in array(entries) {
            if let Value::BulkString(data) = entry
                && let Ok(member) = wire::decode_member(&data)
            {
                out.push((node.clone(), member));
            }
        }
    }
    out
}

/// A room's history stream as `XRANGE` (or [`store::READ_HISTORY`]) returned it, with the ages of its entries
/// against Redis's `TIME`. Unreadable entries are skipped.
pub(super) fn stored_history(entries: Value, now: Value) -> Vec<StoredEntry> {
    let mut time = array(now).into_iter().map(text);
    let now_ms = match (
        time.next().and_then(|s| s.parse::<u64>().ok()),
        time.next().and_then(|u| u.parse::<u64>().ok()),
    ) {
        (Some(seconds), Some(micros)) => seconds * 1000 + micros / 1000,
        _ => 0,
    };
    let mut out = Vec::new();
    for entry in array(entries) {
        let mut parts = array(entry).into_iter();
        let (Some(id), Some(fields)) = (parts.next(), parts.next()) else { continue };
        let written_ms = text(id).split('-').next().and_then(|ms| ms.parse::<u64>().ok()).unwrap_or(now_ms);
        let (mut epoch, mut offset, mut frame, mut except) = (None, None, None, Vec::new());
        let mut fields = array(fields).into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            match text(name).as_str() {
                "e" => epoch = Some(text(value)),
                "o" => offset = text(value).parse::<u64>().ok(),
                "f" => {
                    if let Value::BulkString(data) = value {
                        frame = Some(bytes::Bytes::from(data));
                    }
                }
                "x" => except = text(value).split(',').filter_map(|id| id.parse().ok()).collect(),
                _ => {}
            }
        }
        if let (Some(epoch), Some(offset), Some(frame)) = (epoch, offset, frame) {
            let age = std::time::Duration::from_millis(now_ms.saturating_sub(written_ms));
            out.push(StoredEntry { epoch, offset, frame, except, age });
        }
    }
    out
}

pub(super) fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => Vec::new(),
    }
}

pub(super) fn text(value: Value) -> String {
    match value {
        Value::BulkString(data) => String::from_utf8_lossy(&data).into_owned(),
        Value::SimpleString(s) => s,
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

pub(super) fn int(value: Value) -> u64 {
    match value {
        Value::Int(i) => i.max(0) as u64,
        other => text(other).parse().unwrap_or(0),
    }
}
