//! Heartbeat bookkeeping for one session: when to ping, when to give up.
//!
//! Any frame from the client counts as life. After `interval` without life the session
//! pings; after `interval + pong_timeout` without life it is reaped, whatever state its
//! write side is in. The session's task sleeps until [`Heartbeat::next_wake`], so an
//! idle connection costs one timer entry, not a periodic task.

use tokio::time::{Duration, Instant};

#[derive(Debug)]
pub struct Heartbeat {
    last_seen: Instant,
    /// The interval and the pong timeout in milliseconds (a parked session keeps this
    /// struct: 32 bytes so, 56 with two `Duration`s).
    interval_ms: u32,
    pong_timeout_ms: u32,
    /// Whether a ping has been sent since `last_seen`.
    pinged: bool,
}

/// Milliseconds, at most `u32::MAX` (49 days).
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// What the session should do when it wakes.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    /// Nothing is due yet.
    Idle,
    /// Send a ping now.
    Ping,
    /// No sign of life for interval + pong timeout: drop the connection.
    Reap,
}

impl Heartbeat {
    pub fn new(interval: Duration, pong_timeout: Duration, now: Instant) -> Self {
        Self {
            last_seen: now,
            interval_ms: millis(interval),
            pong_timeout_ms: millis(pong_timeout),
            pinged: false,
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.into())
    }

    fn pong_timeout(&self) -> Duration {
        Duration::from_millis(self.pong_timeout_ms.into())
    }

    /// The client showed life.
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = now;
        self.pinged = false;
    }

    /// When the session must next call [`Heartbeat::poll`].
    pub fn next_wake(&self) -> Instant {
        if self.pinged {
            self.last_seen + self.interval() + self.pong_timeout()
        } else {
            self.last_seen + self.interval()
        }
    }

    pub fn poll(&mut self, now: Instant) -> Beat {
        if now >= self.last_seen + self.interval() + self.pong_timeout() {
            Beat::Reap
        } else if !self.pinged && now >= self.last_seen + self.interval() {
            self.pinged = true;
            Beat::Ping
        } else {
            Beat::Idle
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_then_reaps_a_silent_client() {
        let start = Instant::now();
        let mut hb = Heartbeat::new(Duration::from_secs(30), Duration::from_secs(10), start);
        assert_eq!(hb.next_wake(), start + Duration::from_secs(30));
        tokio::time::sleep_until(hb.next_wake()).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Ping);
        assert_eq!(hb.next_wake(), start + Duration::from_secs(40));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Idle);
        tokio::time::sleep_until(hb.next_wake()).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Reap);
    }

    #[tokio::test(start_paused = true)]
    async fn any_life_resets_the_clock() {
        let start = Instant::now();
        let mut hb = Heartbeat::new(Duration::from_secs(30), Duration::from_secs(10), start);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Ping);
        tokio::time::sleep(Duration::from_secs(8)).await;
        hb.seen(Instant::now()); // the pong (or any frame) arrived
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(hb.poll(Instant::now()), Beat::Idle);
        assert_eq!(hb.next_wake(), start + Duration::from_secs(31 + 8 + 30));
    }
}
