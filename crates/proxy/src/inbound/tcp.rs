//! TCP to this workload: one authorization decision per connection (the
//! rules' L4 form, and a CUSTOM gRPC authorizer's answer when a CUSTOM rule
//! matches), then bytes both ways with half-close. When the policies
//! change, the connection is checked again and closed if it is now denied.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{ConnInfo, InboundTarget};
use crate::Shared;
use crate::ext_authz::{Check, ExtAuthzAnswer};
use crate::io::Metered;
use crate::metrics::istio::{self, ResponseFlags};
use crate::metrics::{DecisionLabels, Direction};

pub async fn serve<S>(stream: S, info: ConnInfo, target: Arc<InboundTarget>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut changes = shared.policies.subscribe();
    let snapshot = changes.borrow_and_update().clone();
    let mut custom = None;
    let decision = decide(&shared, &snapshot.policy, &info, &mut custom).await;
    let mut record = info.record(&target, "TCP", snapshot.version);
    if let Some(ext) = &custom {
        record.ext_authz = Some(ext.verdict_name());
        if let Some(metadata) = ext.dynamic_metadata.clone() {
            tracing::info!(%metadata, "CUSTOM authorizer's dynamic metadata");
            record.ext_authz_metadata = Some(metadata);
        }
    }
    record.stage = Some(decision.stage);
    record.mtls_mode = Some(decision.mtls_mode.as_str());
    if let Some(rule) = decision.authz.as_ref().and_then(|a| a.deciding.as_ref()) {
        record.policy = Some(rule.policy.to_string());
        record.rule = rule.rule;
    }
    crate::facts::add(&mut record, &shared, &snapshot.policy, &info, None, None);
    let count = |decision: &'static str, policy: Option<&String>| {
        shared
            .metrics
            .connections
            .get_or_create(&DecisionLabels {
                direction: Direction::Inbound,
                decision,
                policy: policy.cloned().unwrap_or_default(),
            })
            .inc();
    };
    let labels = shared.metrics.istio.inbound(
        info.peer.as_ref().map(|p| &*p.id),
        None,
        istio::Protocol::Tcp,
    );
    if !decision.allowed() {
        count("deny", record.policy.as_ref());
        // Opened and closed at once, as Envoy counts one its RBAC filter
        // closes; flagged `UAEX` when the CUSTOM authorizer denied or failed.
        let external = decision.stage == meshward_policy::Stage::Authorization
            && custom.as_ref().is_some_and(|c| !c.allowed());
        let labels = match external {
            true => labels.with_flags(ResponseFlags::UnauthorizedExternalService),
            false => labels,
        };
        drop(shared.metrics.istio.tcp_opened(&labels));
        record.decision = "deny";
        record.reason = Some(decision.reason(&snapshot.policy, &info.connection, None));
        record.duration_ms = info.started.elapsed().as_secs_f64() * 1e3;
        shared.logs.access.write(&record);
        return;
    }
    count("allow", record.policy.as_ref());
    let (mut app, _) = match target.connector.connect().await {
        Ok(app) => app,
        Err(e) => {
            shared.metrics.upstream_error(Direction::Inbound);
            let flags = ResponseFlags::UpstreamConnectionFailure;
            drop(shared.metrics.istio.tcp_opened(&labels.with_flags(flags)));
            record.error = Some(e.to_string());
            record.duration_ms = info.started.elapsed().as_secs_f64() * 1e3;
            shared.logs.access.write(&record);
            return;
        }
    };
    let connection = shared.metrics.istio.tcp_opened(&labels);
    let mut stream = Metered::new(stream, &connection);
    let copy = tokio::io::copy_bidirectional(&mut stream, &mut app);
    tokio::pin!(copy);
    let mut watching = true;
    let outcome = loop {
        tokio::select! {
            result = &mut copy => break result.map_err(|e| e.to_string()),
            _ = shared.stop_now.cancelled() => break Err("closed: the drain grace period ended".to_owned()),
            changed = changes.changed(), if watching => {
                if changed.is_err() {
                    // The store is gone (shutting down): nothing more to re-check.
                    watching = false;
                    continue;
                }
                let snapshot = changes.borrow_and_update().clone();
                let again = decide(&shared, &snapshot.policy, &info, &mut custom).await;
                if !again.allowed() {
                    record.decision = "deny";
                    record.config_version = snapshot.version;
                    record.reason = Some(format!(
                        "closed: the policies changed and now deny it: {}",
                        again.reason(&snapshot.policy, &info.connection, None)
                    ));
                    if let Some(rule) = again.authz.as_ref().and_then(|a| a.deciding.as_ref()) {
                        record.policy = Some(rule.policy.to_string());
                        record.rule = rule.rule;
                    }
                    count("deny", record.policy.as_ref());
                    // The byte counts of a cut connection are not known.
                    break Ok((0, 0));
                }
            }
        }
    };
    match outcome {
        Ok((received, sent)) => {
            record.bytes_received = received;
            record.bytes_sent = sent;
        }
        Err(e) => record.error = Some(e),
    }
    record.duration_ms = info.started.elapsed().as_secs_f64() * 1e3;
    shared.logs.access.write(&record);
}

/// The decision for a TCP connection: the engine's, after asking the
/// CUSTOM provider when a CUSTOM rule matches (the engine matches only
/// `envoyExtAuthzGrpc` providers on TCP, as Istio does). The authorizer is
/// asked once per connection, before anything reaches the application; its
/// answer (kept in `asked`) stands when the policies change and the
/// connection is checked again.
async fn decide(
    shared: &Shared,
    policy: &meshward_policy::WorkloadPolicy,
    info: &ConnInfo,
    asked: &mut Option<ExtAuthzAnswer>,
) -> meshward_policy::InboundDecision {
    let authenticated = match policy.authenticate(&info.connection, None) {
        Ok(a) => a,
        Err(denied) => return *denied,
    };
    let provider = {
        let attrs = authenticated.attributes(policy, &info.connection, None);
        policy
            .authz
            .custom_check(&attrs)
            .map(|c| c.provider.clone())
    };
    let custom = match (provider, asked.as_ref()) {
        (None, _) => None,
        (Some(_), Some(earlier)) => Some(earlier.verdict.0.clone()),
        (Some(provider), None) => {
            let peers = info.peers(&shared.identity);
            let check = Check {
                peers: &peers,
                http: None,
            };
            let answer = shared.ext_authz.check(&provider, check).await;
            let verdict = answer.verdict.0.clone();
            *asked = Some(answer);
            Some(verdict)
        }
    };
    authenticated.authorize(policy, &info.connection, None, custom)
}
