//! The admin API on what happened lately: usage per minute over the last day (per key and per
//! tenant), the most recent quota events, and the alerts sent. The dashboard draws these.

use super::{error, rfc3339, Admin, Answer};
use crate::quota::keys::now_millis;
use crate::quota::keys::series::{SeriesOf, SeriesPoints, MINUTES};
use http::StatusCode;
use serde_json::{json, Value};

/// The most points one series of `/admin/usage` may have (e.g. a day in 6-minute steps).
const MAX_POINTS: usize = 240;

impl Admin {
    /// `GET /admin/usage?minutes=60&step=1`: requests and tokens of every key and tenant over
    /// the last `minutes` (at most a day, the default), in points of `step` minutes (6 by
    /// default), oldest first; the last point is the current minute. At most [`MAX_POINTS`]
    /// points a series, and a series with nothing in it is an empty list: the answer stays
    /// small for a pool of thousands of mostly idle keys. With Redis answering, the counts are
    /// the fleet's (`"shared": true`); otherwise this instance's own (`"shared": false`).
    pub(super) async fn usage(&self, query: Option<&str>) -> Answer {
        let mut minutes = MINUTES;
        let mut step = 6;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = match value.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("{name} must be a whole number of minutes, at least 1"),
                    )
                }
            };
            match name {
                "minutes" => minutes = number.min(MINUTES),
                "step" => step = number,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "known parameters: minutes (at most 1440), step",
                    )
                }
            }
        }
        let step = step.min(minutes);
        if minutes.div_ceil(step) > MAX_POINTS {
            return error(
                StatusCode::BAD_REQUEST,
                format!("at most {MAX_POINTS} points a series: raise step (minutes / step)"),
            );
        }
        let now = now_millis();
        // Owned, not guards: the read below awaits Redis.
        let rt = self.shared.runtime.load_full();
        let tables: Vec<_> = rt
            .pools
            .iter()
            .map(|p| (p.name(), p.keys.load_full()))
            .collect();
        let tenants = rt.tenants.list();
        let mut whose = Vec::new();
        let mut local = Vec::new();
        for (pool, table) in &tables {
            for k in 0..table.len() {
                let key = table.key(crate::quota::keys::KeyId(k as u32));
                whose.push(SeriesOf::Key {
                    pool,
                    fingerprint: &key.fingerprint,
                });
                local.push(&key.usage.minutes);
            }
        }
        for t in tenants.iter() {
            whose.push(SeriesOf::Tenant(&t.name));
            local.push(&t.state.usage.minutes);
        }
        // With Redis: the fleet's sums, plus what this instance has not sent yet.
        let first = SeriesPoints::first_minute(now, minutes, step);
        let fleet = match self.shared.series.get() {
            Some(shared) => shared.read(&whose, first, now / 60_000).await,
            None => None,
        };
        let mut points = local.iter().enumerate().map(|(i, series)| {
            let mut p = series.read(now, minutes, step);
            if let Some(fleet) = &fleet {
                let counts = [fleet.get(i).cloned().unwrap_or_default(), series.unsent()];
                let sums = SeriesPoints::from_minutes(now, minutes, step, &counts);
                // Never less than this instance served itself (Redis wiped or restarted empty,
                // counts older than the catch-up window never sent).
                p.at_least(&sums);
            }
            // A series with nothing in it is sent as empty lists.
            let idle = p.requests.iter().chain(&p.tokens).all(|&n| n == 0);
            if idle {
                (Vec::new(), Vec::new())
            } else {
                (p.requests, p.tokens)
            }
        });
        let mut keys = Vec::new();
        for (pool, table) in &tables {
            for k in 0..table.len() {
                let key = table.key(crate::quota::keys::KeyId(k as u32));
                let (requests, tokens) = points.next().unwrap_or_default();
                keys.push(json!({
                    "pool": pool,
                    "key": key.fingerprint,
                    "requests": requests,
                    "tokens": tokens,
                }));
            }
        }
        let tenants: Vec<Value> = tenants
            .iter()
            .map(|t| {
                let (requests, tokens) = points.next().unwrap_or_default();
                json!({ "name": &*t.name, "requests": requests, "tokens": tokens })
            })
            .collect();
        Answer(
            StatusCode::OK,
            json!({
                "end": rfc3339(now),
                "minutes": minutes,
                "step": step,
                // Whether these are the fleet's sums (Redis answered) or this instance's own.
                "shared": fleet.is_some(),
                "keys": keys,
                "tenants": tenants,
            }),
        )
    }

    /// `GET /admin/events`: the most recent quota events (newest first) and the alerts sent.
    pub(super) fn events(&self) -> Answer {
        let quota: Vec<Value> = self
            .shared
            .quota_events
            .list()
            .into_iter()
            .map(|e| {
                json!({
                    "at": rfc3339(e.at),
                    "pool": e.pool,
                    "key": e.key,
                    "project": e.project,
                    "model": e.model,
                    "reason": e.reason,
                    "action": e.action,
                    "until": e.until.map(rfc3339),
                    "message": e.message,
                })
            })
            .collect();
        let alerts = self.shared.alerts.as_ref().map(|a| {
            let s = a.stats();
            let sent: Vec<Value> = a
                .history()
                .into_iter()
                .map(|h| {
                    json!({
                        "at": h.at.to_rfc3339(),
                        "kind": h.kind,
                        "text": h.text,
                        "result": h.result,
                    })
                })
                .collect();
            json!({
                "delivered": s.delivered,
                "failed": s.failed,
                "rate_limited": s.rate_limited,
                "queue_full": s.queue_full,
                "sent": sent,
            })
        });
        Answer(
            StatusCode::OK,
            json!({ "quota_events": quota, "alerts": alerts }),
        )
    }
}
