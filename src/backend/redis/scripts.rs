//! The Lua scripts every step runs inside Redis, atomically: Redis runs one
//! script at a time, so what a script reads and what it writes are one
//! step for every other client.
//!
//! They are loaded once at connect (`SCRIPT LOAD`) and run by `EVALSHA`;
//! redis-rs' [`redis::Script`] falls back to loading a script again when
//! Redis answers `NOSCRIPT` (a restarted or flushed Redis forgot them).
//!
//! Keys a script touches that it cannot name in `KEYS` in advance (the
//! session key of each contender it looks at, `{prefix}:session:{sid}`) are
//! built from `ARGV`: fine on one Redis instance, which is what this backend
//! supports (a Redis Cluster would refuse them across slots).
//!
//! A contender is a member `{sid}:{n}` of a lock's queue (a sorted set
//! scored by its fencing token), or `{sid}:{n}:r` for a reader (a shared
//! lock); it is alive while its server session key `{prefix}:session:{sid}`
//! exists. A writer is granted when it is the first live contender; a
//! reader when no live writer is ahead of it (readers hold together, and a
//! reader behind a queued writer waits for it: no writer is starved). A
//! server that predates readers takes `:r` members for writers: stricter. A message on a lock's channel names
//! the contender that is first as it is sent and how long its session has
//! left (`{member} {pttl}`), or is `p` (something changed: from a census,
//! or a writer left from behind the head, so the readers behind it look).
//! A waiting reader looks at every message: a new head may be the writer
//! it waited for gone.
//! A contender named there stays first until it is removed, since later
//! ones queue behind it: it needs no look of its own, and the waiters
//! behind it need none before its session could expire. Whether that key exists is judged by
//! Redis alone, on its own clock (the key's `PEXPIRE` deadline; inside a
//! script Redis 7 judges expiry at the script's start): never by ours.

use redis::{Cmd, FromRedisValue, RedisResult, Script};

/// Lua shared by the scripts that look at a queue's head.
const HEAD: &str = r"
-- Whether contender m is a reader (a shared lock).
local function is_reader(m)
  return string.sub(m, -2) == ':r'
end
-- The first contender of queue q whose server session (sp .. its sid) is
-- alive, after removing those ahead of it whose session expired; and how
-- many were removed. `mine` (a contender whose session the caller knows is
-- alive) needs no look at its session. (Callers that removed any announce
-- the new head: readers behind a dead writer look then.)
local function first_live(q, sp, mine)
  local purged = 0
  while true do
    local head = redis.call('ZRANGE', q, 0, 0)[1]
    if not head then return nil, purged end
    if head == mine then return head, purged end
    if redis.call('EXISTS', sp .. string.match(head, '^([^:]*)')) == 1 then return head, purged end
    redis.call('ZREM', q, head)
    purged = purged + 1
  end
end
-- For reader m (score: its token) in queue q: the milliseconds the session
-- of the first live writer ahead of it has left, or nil when there is none
-- (m may hold). Dead writers ahead are removed on the way (and the queue
-- told to look).
local function writer_ahead(q, sp, score)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', q, '-inf', '(' .. score)) do
    if not is_reader(w) then
      local pttl = redis.call('PTTL', sp .. string.match(w, '^([^:]*)'))
      if pttl ~= -2 then return pttl end
      redis.call('ZREM', q, w)
      redis.call('PUBLISH', q, 'p')
    end
  end
  return nil
end
-- Milliseconds before the session of contender m expires (-1: never).
local function session_pttl(sp, m)
  return redis.call('PTTL', sp .. string.match(m, '^([^:]*)'))
end
-- Names m, first in queue q from now until it is removed, on q's channel,
-- with how long its session has left: '{member} {pttl}'.
local function announce(q, sp, m)
  redis.call('PUBLISH', q, m .. ' ' .. session_pttl(sp, m))
end
-- Removes contender m from queue q (of lock id in version index idx). If
-- it was first, the next live contender (dead ones ahead of it removed) is
-- announced; a writer leaving from further back is announced as 'p' (the
-- readers behind it look); an emptied queue leaves the index and is
-- announced on the index's channel (a drain counts again). The first two
-- members are read at once: a lone holder leaving needs no other look.
-- Returns 1 if m was there.
local function remove_contender(q, idx, m, id, sp)
  local front = redis.call('ZRANGE', q, 0, 1)
  if redis.call('ZREM', q, m) == 0 then return 0 end
  local emptied = false
  if front[1] == m then
    local nxt = front[2] and first_live(q, sp, nil)
    if nxt then announce(q, sp, nxt) else emptied = true end
  elseif not is_reader(m) then
    redis.call('PUBLISH', q, 'p')
  end
  if emptied then
    redis.call('SREM', idx, id)
    redis.call('PUBLISH', idx, id)
  end
  return 1
end
";

/// Acquire: check the kind's record, check our session, take a token, queue
/// the contender, purge dead contenders ahead of it, say whether it is
/// granted (first; for a reader, no live writer ahead).
///
/// KEYS: record, token counter, queue, version index, our session key.
/// ARGV: the record as expected ('' = absent), member, session prefix, id,
/// our session's secret.
/// Returns `{0, record}` (the record differs), `{-1}` (our session is
/// gone), `{1, token}` (first: granted) or `{2, token}` (queued behind).
///
/// This part is the uncontended path, up to "we are first"; the rest
/// (`ACQUIRE_BEHIND`) follows `HEAD` ([`lock_sources`]).
const ACQUIRE_FIRST: &str = r"
local got = redis.call('MGET', KEYS[1], KEYS[5])
local rec = got[1] or ''
if rec ~= ARGV[1] then return {0, rec} end
if got[2] ~= ARGV[5] then return {-1} end
local token = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[3], token, ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
if redis.call('ZRANGE', KEYS[3], 0, 0)[1] == ARGV[2] then return {1, token} end
";

/// The rest of `ACQUIRE`, after `HEAD`: someone is ahead of us.
const ACQUIRE_BEHIND: &str = r"
local head, purged = first_live(KEYS[3], ARGV[3], ARGV[2])
if head == ARGV[2] then return {1, token} end
if purged > 0 then announce(KEYS[3], ARGV[3], head) end
if is_reader(ARGV[2]) and not writer_ahead(KEYS[3], ARGV[3], token) then return {1, token} end
return {2, token}
";

/// A waiter's look: is its contender still queued, and granted (first; for
/// a reader, no live writer ahead)?
///
/// KEYS: queue. ARGV: member, session prefix.
/// Returns `{0}` (gone), `{1}` (granted) or `{2, pttl}`: how long the
/// session of the contender it waits for (the head; a reader's first live
/// writer ahead) has left.
const CHECK: &str = r"
local head, purged = first_live(KEYS[1], ARGV[2], nil)
if head and purged > 0 and head ~= ARGV[1] then announce(KEYS[1], ARGV[2], head) end
if head == ARGV[1] then return {1} end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not head or not score then return {0} end
if is_reader(ARGV[1]) then
  local pttl = writer_ahead(KEYS[1], ARGV[2], score)
  if not pttl then return {1} end
  return {2, pttl}
end
return {2, session_pttl(ARGV[2], head)}
";

/// Removes a contender (release, withdrawn wait): `remove_contender` in
/// `HEAD` says what is announced (readers waiting look at every
/// announcement; a drain counts again when a queue empties).
///
/// KEYS: queue, version index. ARGV: member, id, session prefix.
/// Returns 1 if it was there.
///
/// This part is the lock's only contender leaving (what `remove_contender`
/// does then, without `HEAD`); the rest (`REMOVE_AMONG`) follows `HEAD`
/// ([`lock_sources`]).
const REMOVE_ALONE: &str = r"
local front = redis.call('ZRANGE', KEYS[1], 0, 1)
if front[1] == ARGV[1] and not front[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
";

/// The rest of `REMOVE`, after `HEAD`: others are queued.
const REMOVE_AMONG: &str = r"
return remove_contender(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
";

/// Refreshes our session if the key still holds our secret, and names the
/// held contenders (pairs of queue and member in ARGV) no longer queued.
///
/// KEYS: session key. ARGV: secret, TTL in ms, then queue, member, ...
/// Returns `{0}` (the session key is gone or not ours) or `{1, gone...}`.
const REFRESH: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local out = {1}
for i = 3, #ARGV, 2 do
  if not redis.call('ZSCORE', ARGV[i], ARGV[i + 1]) then out[#out + 1] = ARGV[i + 1] end
end
return out
";

/// Ends our session: removes the contenders named (as `REMOVE` does), then
/// (if asked: the last batch) the session key if it is still ours, so every
/// other contender of it is dead at once.
///
/// KEYS: session key. ARGV: secret, '1' to delete the key, session prefix,
/// then queue, index, member, id, ...
const END: &str = r"
for i = 4, #ARGV, 4 do
  remove_contender(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[3])
end
if ARGV[2] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// Whether the lock has a live contender (purging dead ones at the head).
///
/// KEYS: queue. ARGV: session prefix. Returns 1 or 0.
const HELD: &str = r"
local head, purged = first_live(KEYS[1], ARGV[1], nil)
if head and purged > 0 then announce(KEYS[1], ARGV[1], head) end
if head then return 1 end
return 0
";

/// Counts the live contenders of every lock of a kind under a version,
/// removing dead ones (and ids whose queue is empty from the index).
///
/// KEYS: version index. ARGV: queue prefix (`{prefix}/{kind}/{version}/`),
/// session prefix, how many ids to name. Returns `{total, id, n, ...}`.
const COUNT: &str = r"
local total, named, alive = 0, {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local q = ARGV[1] .. id
  local removed = 0
  for _, m in ipairs(redis.call('ZRANGE', q, 0, -1)) do
    local sid = string.match(m, '^([^:]*)')
    if alive[sid] == nil then alive[sid] = redis.call('EXISTS', ARGV[2] .. sid) == 1 end
    if not alive[sid] then
      redis.call('ZREM', q, m)
      removed = removed + 1
    end
  end
  local n = redis.call('ZCARD', q)
  if n == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    if removed > 0 then redis.call('PUBLISH', q, 'p') end
    total = total + n
    if #named < 2 * tonumber(ARGV[3]) then
      named[#named + 1] = id
      named[#named + 1] = n
    end
  end
end
local out = {total}
for _, v in ipairs(named) do out[#out + 1] = v end
return out
";

/// Claims a kind's rotation unless a live session holds the claim; returns
/// the record with the answer.
///
/// KEYS: claim, record. ARGV: claim value (naming `session {sid}`),
/// session prefix. Returns `{1, record}` or `{0, record, their claim}`.
const CLAIM: &str = r"
local c = redis.call('GET', KEYS[1])
local rec = redis.call('GET', KEYS[2]) or ''
if c then
  local sid = string.match(c, 'session (%x+)')
  if sid and redis.call('EXISTS', ARGV[2] .. sid) == 1 then return {0, rec, c} end
end
redis.call('SET', KEYS[1], ARGV[1])
return {1, rec}
";

/// Deletes the claim if it still holds our value. KEYS: claim. ARGV: value.
const UNCLAIM: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Writes the kind's record if it is still as expected, and announces the
/// change on the record's channel.
///
/// KEYS: record. ARGV: expected ('' = absent), new record.
/// Returns `{1}` or `{0, record now}`.
const SET_RECORD: &str = r"
local rec = redis.call('GET', KEYS[1]) or ''
if rec ~= ARGV[1] then return {0, rec} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], 'v')
return {1}
";

/// `SET_RECORD`, only if no live session claims the kind's rotation (an
/// abandoned drain put back to normal).
///
/// KEYS: record, claim. ARGV: expected, new record, session prefix.
const ABORT_ABANDONED: &str = r"
local c = redis.call('GET', KEYS[2])
if c then
  local sid = string.match(c, 'session (%x+)')
  if sid and redis.call('EXISTS', ARGV[3] .. sid) == 1 then return {0} end
end
local rec = redis.call('GET', KEYS[1]) or ''
if rec ~= ARGV[1] then return {0} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], 'v')
return {1}
";

/// Deletes every lock of a kind under a version (after a switch away from
/// it). KEYS: version index. ARGV: queue prefix. Returns how many locks.
const CLEAN_UP: &str = r"
local ids = redis.call('SMEMBERS', KEYS[1])
for _, id in ipairs(ids) do redis.call('DEL', ARGV[1] .. id) end
redis.call('DEL', KEYS[1])
return #ids
";

/// An `EVALSHA` of `script` with `keys` keys, its keys and arguments to be
/// appended in order: built straight into one command, where a
/// [`redis::ScriptInvocation`] copies each key and argument twice (into its
/// own vectors, then into the command) — the hot path's scripts (`ACQUIRE`,
/// `CHECK`, `REMOVE`) are built this way and sent by [`run`].
pub(super) fn evalsha(script: &Script, keys: usize) -> Cmd {
    // Room for the hot scripts' at most 13 arguments and their bytes.
    let mut cmd = Cmd::with_capacity(16, 256);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    cmd
}

/// Sends `cmd` (from [`evalsha`] for `script`); if Redis answers `NOSCRIPT`
/// (restarted or flushed, it forgot the script, which therefore did not
/// run), loads `script` and sends `cmd` again — as
/// [`redis::ScriptInvocation::invoke_async`] does.
///
/// # Errors
/// What Redis or the connection answered.
pub(super) async fn run<T: FromRedisValue>(
    conn: &mut impl redis::aio::ConnectionLike,
    script: &Script,
    cmd: &Cmd,
) -> RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        answer => answer,
    }
}

/// The sources of `ACQUIRE` and `REMOVE`, as loaded. Each starts with its
/// uncontended path (the lock's only contender), which returns before
/// `HEAD`'s helpers are made: Redis runs a script's body afresh on every
/// call, so every `local function` is a new closure — garbage for its
/// collector — on every call that reaches it.
pub(super) fn lock_sources() -> (String, String) {
    (
        format!("{ACQUIRE_FIRST}{HEAD}{ACQUIRE_BEHIND}"),
        format!("{REMOVE_ALONE}{HEAD}{REMOVE_AMONG}"),
    )
}

/// Every script, compiled once (its SHA1 computed) per backend.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) acquire: Script,
    pub(super) check: Script,
    pub(super) remove: Script,
    pub(super) refresh: Script,
    pub(super) end: Script,
    pub(super) held: Script,
    pub(super) count: Script,
    pub(super) claim: Script,
    pub(super) unclaim: Script,
    pub(super) set_record: Script,
    pub(super) abort_abandoned: Script,
    pub(super) clean_up: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        let with_head = |body: &str| Script::new(&format!("{HEAD}{body}"));
        let (acquire, remove) = lock_sources();
        Scripts {
            acquire: Script::new(&acquire),
            check: with_head(CHECK),
            remove: Script::new(&remove),
            refresh: Script::new(REFRESH),
            end: with_head(END),
            held: with_head(HELD),
            count: Script::new(COUNT),
            claim: Script::new(CLAIM),
            unclaim: Script::new(UNCLAIM),
            set_record: Script::new(SET_RECORD),
            abort_abandoned: Script::new(ABORT_ABANDONED),
            clean_up: Script::new(CLEAN_UP),
        }
    }

    /// All of them, for loading at connect.
    pub(super) fn all(&self) -> [&Script; 12] {
        [
            &self.acquire,
            &self.check,
            &self.remove,
            &self.refresh,
            &self.end,
            &self.held,
            &self.count,
            &self.claim,
            &self.unclaim,
            &self.set_record,
            &self.abort_abandoned,
            &self.clean_up,
        ]
    }
}
