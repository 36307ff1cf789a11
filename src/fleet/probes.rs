//! Cap probes claimed across the fleet: the instance whose request would test a capped scope
//! first claims the scope's probe in Redis for one probe interval (`SET NX PX`, so Redis's
//! clock decides when the next may go). The others find it taken and leave the scope alone,
//! so one request of the whole fleet tests a cap each interval. Redis down or slow: each
//! instance probes on its own, as without Redis.

use super::store::Names;
use super::Fleet;
use crate::quota::keys::Millis;
use crate::runtime::health::SharedProbes;
use async_trait::async_trait;
use std::sync::Arc;

/// This instance's handle on the fleet's cap probes.
pub struct FleetProbes(pub Arc<Fleet>);

#[async_trait]
impl SharedProbes for FleetProbes {
    async fn claim_probe(&self, pool: &str, scope: &str, name: &str, every_ms: Millis) -> bool {
        let fleet = &self.0;
        let Some(mut c) = fleet.lock().clone().filter(|_| fleet.is_up_now()) else {
            return true;
        };
        let entry = Names::new(&fleet.config.key_prefix, pool).probe(scope, name);
        let mut set = redis::cmd("SET");
        set.arg(&entry)
            .arg(&fleet.id)
            .arg("NX")
            .arg("PX")
            .arg(every_ms.max(1));
        let claimed = tokio::time::timeout(
            fleet.config.timeout,
            set.query_async::<Option<String>>(&mut c),
        )
        .await;
        match claimed {
            Ok(Ok(answer)) => {
                if answer.is_none() {
                    log::info!(
                        "pool {pool}: another instance probes the cap on {scope} {name:?} this interval"
                    );
                }
                answer.is_some()
            }
            _ => true,
        }
    }
}
