//! Which endpoints take new flows, for the VIPs, the routing mesh and DNS alike. A task whose
//! service checks health takes them once healthy and stops when it is not; a service none of
//! whose tasks is healthy keeps routing to its unhealthy ones (fail open: a health check that
//! fails everywhere at once, say a shared dependency down, must not turn a degraded service
//! into no service). Starting tasks never take new flows. Tasks without a check always do.

use std::collections::BTreeSet;

use shoal_gossip::{EndpointHealth, EndpointRecord};

/// Whether an endpoint takes new flows on its own merit.
fn serving(record: &EndpointRecord) -> bool {
    matches!(record.health, None | Some(EndpointHealth::Healthy))
}

/// The services (IDs) of `view` that route to unhealthy tasks because none is healthy.
pub fn failing_open(view: &[(String, EndpointRecord)]) -> BTreeSet<String> {
    let serving_services: BTreeSet<&str> = view
        .iter()
        .filter(|(_, r)| serving(r))
        .map(|(_, r)| r.service_id.as_str())
        .collect();
    view.iter()
        .filter(|(_, r)| r.health == Some(EndpointHealth::Unhealthy))
        .filter(|(_, r)| !serving_services.contains(r.service_id.as_str()))
        .map(|(_, r)| r.service_id.clone())
        .collect()
}

/// The endpoints of `view` that take new flows.
pub fn routable(view: &[(String, EndpointRecord)]) -> Vec<(String, EndpointRecord)> {
    let open = failing_open(view);
    view.iter()
        .filter(|(_, r)| {
            serving(r)
                || (r.health == Some(EndpointHealth::Unhealthy) && open.contains(&r.service_id))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(
        service: &str,
        task: u32,
        health: Option<EndpointHealth>,
    ) -> (String, EndpointRecord) {
        let mut record = shoal_gossip::sim::sample_endpoint(1, task);
        record.service_id = service.into();
        record.health = health;
        (record.task_id.clone(), record)
    }

    fn tasks(view: &[(String, EndpointRecord)]) -> Vec<String> {
        routable(view).into_iter().map(|(key, _)| key).collect()
    }

    use EndpointHealth::{Healthy, Starting, Unhealthy};

    #[test]
    fn only_healthy_and_unchecked_tasks_take_new_flows() {
        let view = [
            endpoint("web", 1, Some(Healthy)),
            endpoint("web", 2, Some(Unhealthy)),
            endpoint("web", 3, Some(Starting)),
            endpoint("api", 4, None),
        ];
        assert_eq!(tasks(&view), ["task1", "task4"]);
        assert!(failing_open(&view).is_empty());
    }

    #[test]
    fn a_service_without_a_healthy_task_fails_open_to_its_unhealthy_ones() {
        let view = [
            endpoint("web", 1, Some(Unhealthy)),
            endpoint("web", 2, Some(Unhealthy)),
            endpoint("web", 3, Some(Starting)),
            endpoint("api", 4, Some(Healthy)),
            endpoint("api", 5, Some(Unhealthy)),
        ];
        assert_eq!(tasks(&view), ["task1", "task2", "task4"]);
        assert_eq!(failing_open(&view), BTreeSet::from(["web".to_owned()]));
    }

    #[test]
    fn starting_tasks_alone_take_nothing() {
        let view = [endpoint("web", 1, Some(Starting))];
        assert!(tasks(&view).is_empty());
        assert!(failing_open(&view).is_empty());
    }
}
