//! What cluster mode keeps in Redis: the key and channel names, and the Lua scripts
//! that read or change several keys in one atomic step (lease, presence, snapshot).
//!
//! Every key lives under `roomcast:`. Room names are limited to `A-Z a-z 0-9 . _ : -`,
//! so they are embedded in key names as they are. The scripts build some key names
//! themselves (a room's per-node presence hashes), which standalone Redis and Sentinel
//! allow; Redis Cluster does not, and is not supported.

/// `SET`-if-absent by the node id; renewed by the owner's heartbeat.
pub fn owner_key(room: &str) -> String {
    format!("roomcast:room:{room}:owner")
}

/// The room's lease term: a number that grows with every claim of the lease. The
/// owner tags its deliveries with it, so that a follower drops what an owner that
/// lost the lease still published (it stalled past its lease, and a successor's
/// term is higher).
pub fn term_key(room: &str) -> String {
    format!("roomcast:room:{room}:term")
}

/// The owner's latest plugin snapshot ([`super::wire::Snapshot`]).
pub fn state_key(room: &str) -> String {
    format!("roomcast:room:{room}:state")
}

/// The room's history (recovery): a stream the owner appends every broadcast to, in
/// the room's one order (fields `e` epoch, `o` offset, `f` the room-protocol frame),
/// trimmed to the room's history size and expiring a time to live after its last entry.
pub fn history_key(room: &str) -> String {
    format!("roomcast:room:{room}:history")
}

/// The most frame bytes one read of a room's stored history returns (its newest
/// entries): a room's history in memory is much smaller (half a member's queue), so
/// more could never be used, and a stream that grew large (big messages, a large
/// `size`) is never read whole.
pub const HISTORY_READ_BYTES: u64 = 32 << 20;

/// The most entries one read of a room's stored history returns (a room's `size`
/// is at most this).
pub const HISTORY_READ_ENTRIES: u64 = 100_000;

/// A room's stored history, oldest first, as `XRANGE` gives it, but only its newest
/// entries up to a byte and an entry budget.
///
/// KEYS: history. ARGV: most frame bytes, most entries.
pub const READ_HISTORY: &str = r#"
local budget, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local picked, bytes, from, full = {}, 0, '+', false
while not full and #picked < limit do
  local batch = redis.call('XREVRANGE', KEYS[1], from, '-', 'COUNT', 256)
  if #batch == 0 then break end
  for _, entry in ipairs(batch) do
    local fields, size = entry[2], 0
    for i = 1, #fields, 2 do
      if fields[i] == 'f' then size = #fields[i + 1] end
    end
    if bytes + size > budget or #picked >= limit then
      full = true
      break
    end
    bytes = bytes + size
    picked[#picked + 1] = entry
    from = '(' .. entry[1]
  end
end
local out = {}
for i = #picked, 1, -1 do out[#out + 1] = picked[i] end
return out
"#;

/// Add the bounded read of `room`'s stored history ([`READ_HISTORY`]) to `pipe`.
pub fn read_history_cmd(pipe: &mut redis::Pipeline, room: &str) {
    pipe.cmd("EVAL")
        .arg(READ_HISTORY)
        .arg(1)
        .arg(history_key(room))
        .arg(HISTORY_READ_BYTES)
        .arg(HISTORY_READ_ENTRIES);
}

/// The set of nodes with members in the room.
pub fn nodes_key(room: &str) -> String {
    format!("roomcast:room:{room}:nodes")
}

/// The prefix of a room's per-node presence hashes (member id → member entry).
pub fn members_prefix(room: &str) -> String {
    format!("roomcast:room:{room}:members:")
}

pub fn members_key(room: &str, node: &str) -> String {
    format!("roomcast:room:{room}:members:{node}")
}

/// Sorted set: room name → when its presence expires (Redis time, ms).
pub const ROOMS_KEY: &str = "roomcast:rooms";

/// Counter handing each starting node a distinct member-id prefix.
pub const NODE_SEQ_KEY: &str = "roomcast:node-seq";

pub fn node_key(node: &str) -> String {
    format!("roomcast:node:{node}")
}

/// Events for the room's owner.
pub fn in_channel(room: &str) -> String {
    format!("roomcast:room:{room}:in")
}

/// Deliveries from the room's owner.
pub fn out_channel(room: &str) -> String {
    format!("roomcast:room:{room}:out")
}

/// Which room and direction a channel name stands for.
pub fn parse_channel(channel: &str) -> Option<(&str, Direction)> {
    let rest = channel.strip_prefix("roomcast:room:")?;
    let (room, kind) = rest.rsplit_once(':')?;
    match kind {
        "in" => Some((room, Direction::In)),
        "out" => Some((room, Direction::Out)),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// The heartbeat of one room on one node: refresh this node's presence, renew the
/// lease if it is ours, and say who owns the room.
///
/// KEYS: owner, state, nodes, this node's members hash, rooms, term.
/// ARGV: node, lease ms, presence ms, room, members prefix, state ms.
/// Returns `{"mine", node, count, node, count, ...}` (live nodes and their member
/// counts), `{"other", owner}` or `{"vacant"}`.
pub const TICK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('PEXPIRE', KEYS[4], ARGV[3]) == 1 then
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[3]), ARGV[4])
end
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  redis.call('PEXPIRE', KEYS[6], ARGV[6])
  local out = {'mine'}
  for _, n in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local count = redis.call('HLEN', ARGV[5] .. n)
    if count == 0 then
      redis.call('SREM', KEYS[3], n)
    else
      table.insert(out, n)
      table.insert(out, count)
    end
  end
  return out
elseif owner then
  return {'other', owner}
end
return {'vacant'}
"#;

/// Take the lease if nobody holds it (or renew it if we do), with the room's term.
///
/// A claim's term is the larger of the last term plus one and Redis's clock in
/// microseconds, so terms grow even if the term key was lost (Redis restarted empty,
/// or the key expired while nobody held the room).
///
/// KEYS: owner, term. ARGV: node, lease ms, term ms.
/// Returns `{"claimed", term}`, `{"mine", term}` or `{"other", owner}`.
pub const CLAIM: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return {'other', owner}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local term = tonumber(redis.call('GET', KEYS[2]) or '0')
if owner and term > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {'mine', string.format('%.0f', term)}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if now > term then term = now else term = term + 1 end
redis.call('SET', KEYS[2], string.format('%.0f', term), 'PX', ARGV[3])
if owner then return {'mine', string.format('%.0f', term)} end
return {'claimed', string.format('%.0f', term)}
"#;

/// Every live node's members of a room, pruning nodes whose presence expired.
///
/// KEYS: nodes. ARGV: members prefix.
/// Returns `{node, {entry, ...}, node, {entry, ...}, ...}`.
pub const MEMBERS: &str = r#"
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local entries = redis.call('HVALS', ARGV[1] .. n)
  if #entries == 0 then
    redis.call('SREM', KEYS[1], n)
  else
    table.insert(out, n)
    table.insert(out, entries)
  end
end
return out
"#;

/// Store a snapshot, only while the lease is ours (a node that lost the lease must
/// not overwrite its successor's state).
///
/// KEYS: owner, state. ARGV: node, snapshot, state ms. Returns 1 if stored.
pub const SAVE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#;

/// Give the lease up if it is still ours; with ARGV[2] == "drop", delete the state
/// too (the room is empty everywhere).
///
/// KEYS: owner, state. ARGV: node, "keep" or "drop". Returns 1 if released.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == 'drop' then redis.call('DEL', KEYS[2]) end
  return 1
end
return 0
"#;

/// The live rooms of the cluster, pruning expired ones.
///
/// KEYS: rooms. Returns the room names.
pub const KNOWN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;

/// Every live room with its owner and its members per node (the admin view).
///
/// KEYS: rooms. ARGV: "roomcast:room:".
/// Returns `{{room, owner or nil, {node, {id, ...}, ...}}, ...}`.
pub const OVERVIEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, room in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local base = ARGV[1] .. room
  local owner = redis.call('GET', base .. ':owner') or ''
  local nodes = {}
  for _, n in ipairs(redis.call('SMEMBERS', base .. ':nodes')) do
    local ids = redis.call('HKEYS', base .. ':members:' .. n)
    if #ids > 0 then
      table.insert(nodes, n)
      table.insert(nodes, ids)
    end
  end
  table.insert(out, {room, owner, nodes})
end
return out
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_parse_back() {
        assert_eq!(parse_channel(&in_channel("chat:lobby")), Some(("chat:lobby", Direction::In)));
        assert_eq!(parse_channel(&out_channel("a")), Some(("a", Direction::Out)));
        assert_eq!(parse_channel("roomcast:room:a:owner"), None);
        assert_eq!(parse_channel("other"), None);
    }
}
