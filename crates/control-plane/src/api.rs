//! The configuration API (`meshward apply|get|delete|status|revoke`): every
//! call must come from the admin identity, proven by the admin client
//! certificate the server makes at init. Never anonymous.

use std::sync::Arc;

use meshward_api::control::config_service_server::{ConfigService, ConfigServiceServer};
use meshward_api::control::{
    ApplyRequest, ApplyResponse, Change, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    PlaceRequest, RevokeRequest, RevokeResponse, StatusRequest, StatusResponse,
};
use meshward_api::resources::RevocationKind;
use meshward_identity::spiffe::SpiffeId;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::push::Hub;
use crate::store::{Store, StoreError};

/// The service account of the admin credential, in the root namespace.
pub const ADMIN_SERVICE_ACCOUNT: &str = "meshward-admin";

pub struct ConfigApi {
    store: Arc<Store>,
    hub: Arc<Hub>,
    admin: SpiffeId,
    /// Identities that may not be revoked: the control plane's own (every
    /// proxy would refuse the server, and nothing could undo it).
    unrevocable: Vec<SpiffeId>,
    /// This server's advertised address, naming it among several.
    server: String,
}

impl ConfigApi {
    pub fn new(store: Arc<Store>, hub: Arc<Hub>, admin: SpiffeId) -> ConfigApi {
        ConfigApi {
            store,
            hub,
            admin,
            unrevocable: Vec::new(),
            server: String::new(),
        }
    }

    /// Names this server (its advertised address) in `status`, where a
    /// shared store lists the proxies of every server.
    pub fn with_server(mut self, server: String) -> ConfigApi {
        self.server = server;
        self
    }

    /// Refuses to revoke `identities`.
    pub fn with_unrevocable(mut self, identities: Vec<SpiffeId>) -> ConfigApi {
        self.unrevocable = identities;
        self
    }

    /// The caller must present the admin certificate (its chain was verified
    /// against the mesh's roots in the TLS handshake).
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        authorize_admin(&self.admin, request)
    }
}

fn authorize_admin<T>(admin: &SpiffeId, request: &Request<T>) -> Result<(), Status> {
    let (id, _) = crate::push::caller(
        request,
        "the config API needs the admin client certificate (meshward --data-dir or --admin-dir)",
    )?;
    if id != *admin {
        tracing::warn!(caller = %id, "config API call refused: not the admin identity");
        return Err(Status::permission_denied(format!(
            "{id} may not change configuration; only {admin} may"
        )));
    }
    Ok(())
}

/// Refuses a config API request from anyone but the admin on its headers,
/// before its body is read.
#[derive(Clone)]
pub struct AdminOnly(SpiffeId);

impl tonic::service::Interceptor for AdminOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        authorize_admin(&self.0, &request).map(|()| request)
    }
}

/// The config API as served: messages up to `max_message` bytes, decoded
/// only for the admin (so no one else can make the server read a large
/// one); each call checks the caller again.
pub fn config_server(
    api: ConfigApi,
    max_message: usize,
) -> InterceptedService<ConfigServiceServer<ConfigApi>, AdminOnly> {
    let admin_only = AdminOnly(api.admin.clone());
    InterceptedService::new(
        ConfigServiceServer::new(api).max_decoding_message_size(max_message),
        admin_only,
    )
}

fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(errors) => Status::invalid_argument(errors.join("\n")),
        // The request is fine; the object changes in its file instead.
        StoreError::Owned(why) => Status::failed_precondition(why.join("\n")),
        other => Status::internal(other.to_string()),
    }
}

fn applied(changes: Vec<crate::store::Change>, version: u64) -> ApplyResponse {
    ApplyResponse {
        changes: changes
            .into_iter()
            .map(|c| Change {
                key: c.key,
                action: c.action.into(),
            })
            .collect(),
        version,
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        self.authorize(&request)?;
        let ApplyRequest {
            file,
            text,
            mesh_config,
        } = request.into_inner();
        let store = self.store.clone();
        let changes = tokio::task::spawn_blocking(move || {
            if mesh_config {
                store.set_mesh_config(&file, &text).map(|()| {
                    vec![crate::store::Change {
                        key: "MeshConfig".into(),
                        action: "configured",
                    }]
                })
            } else {
                store.apply(&file, &text)
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status_of)?;
        let version = self.store.config().version;
        self.hub.changed(version);
        tracing::info!(version, changes = changes.len(), "configuration applied");
        Ok(Response::new(applied(changes, version)))
    }

    async fn place(
        &self,
        request: Request<PlaceRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        self.authorize(&request)?;
        let PlaceRequest { file, text } = request.into_inner();
        let store = self.store.clone();
        let changes = tokio::task::spawn_blocking(move || store.place(&file, &text))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status_of)?;
        let version = self.store.config().version;
        if changes.iter().any(|c| c.action != "unchanged") {
            self.hub.changed(version);
            tracing::info!(version, placed = changes.len(), "workloads placed");
        }
        Ok(Response::new(applied(changes, version)))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let objects = if r.kind.eq_ignore_ascii_case("MeshConfig") {
            vec![
                serde_json::to_value(&self.store.config().mesh)
                    .map_err(|e| Status::internal(e.to_string()))?,
            ]
        } else if r.kind.eq_ignore_ascii_case("Revocation")
            || r.kind.eq_ignore_ascii_case("Revocations")
        {
            self.store
                .config()
                .revocations
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()
                .map_err(|e| Status::internal(e.to_string()))?
        } else {
            self.store
                .get(&r.kind, r.namespace.as_deref(), r.name.as_deref())
                .map_err(status_of)?
        };
        Ok(Response::new(GetResponse {
            objects_json: serde_json::Value::Array(objects).to_string(),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let store = self.store.clone();
        let deleted =
            tokio::task::spawn_blocking(move || store.delete(&r.kind, &r.namespace, &r.name))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(status_of)?;
        let version = self.store.config().version;
        if deleted {
            self.hub.changed(version);
        }
        Ok(Response::new(DeleteResponse { deleted, version }))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.authorize(&request)?;
        let mut proxies = self.hub.status();
        if self.store.is_shared() {
            for p in &mut proxies {
                p.server.clone_from(&self.server);
            }
            // The other servers' proxies, as each last recorded them (a
            // server that died is gone with its lease).
            let store = self.store.clone();
            let announced = tokio::task::spawn_blocking(move || store.announced())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let own = self.store.server_id().unwrap_or_default();
            for (_, record) in announced.into_iter().filter(|(id, _)| id != own) {
                // Each names its server in its proxies.
                if let Ok(theirs) = <StatusResponse as prost::Message>::decode(record.as_slice()) {
                    proxies.extend(theirs.proxies);
                }
            }
            proxies.sort_by(|a, b| (&a.workload, &a.identity).cmp(&(&b.workload, &b.identity)));
        }
        Ok(Response::new(StatusResponse {
            version: self.store.config().version,
            proxies,
            refused: self.hub.refused(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let kind: RevocationKind = r.kind.parse().map_err(Status::invalid_argument)?;
        if kind == RevocationKind::Identity
            && let Ok(id) = SpiffeId::parse(r.value.trim())
            && self.unrevocable.contains(&id)
        {
            let why = if id == self.admin {
                "the admin identity: revoked, the credential the server makes at every start would be refused too; revoke an old admin certificate by its serial"
            } else {
                "the control plane's own identity: revoked, every proxy would refuse the server"
            };
            return Err(Status::invalid_argument(format!("{id} is {why}")));
        }
        let store = self.store.clone();
        let (revocation, created) =
            tokio::task::spawn_blocking(move || store.revoke(kind, &r.value, &r.reason))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(status_of)?;
        let version = self.store.config().version;
        if created {
            self.hub.changed(version);
            tracing::warn!(
                kind = revocation.kind.as_str(),
                value = %revocation.value,
                reason = %revocation.reason,
                version,
                "revoked"
            );
        }
        Ok(Response::new(RevokeResponse {
            revocation_json: serde_json::to_string(&revocation)
                .map_err(|e| Status::internal(e.to_string()))?,
            created,
            version,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: web}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}\n";

    fn api(dir: &tempfile::TempDir) -> (ConfigApi, Arc<Store>) {
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        let hub = Arc::new(Hub::new(
            store.clone(),
            "cluster.local".into(),
            String::new(),
        ));
        let admin =
            SpiffeId::istio("cluster.local", "istio-system", ADMIN_SERVICE_ACCOUNT).unwrap();
        (ConfigApi::new(store.clone(), hub, admin), store)
    }

    /// A call that arrives without a verified client certificate (as over
    /// a connection whose TLS layer gave none) is refused before anything
    /// is read or written.
    #[tokio::test]
    async fn every_call_without_the_admin_certificate_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (api, store) = api(&dir);
        let version = store.config().version;
        let refused = [
            api.apply(Request::new(ApplyRequest {
                file: "deny.yaml".into(),
                text: DENY.into(),
                mesh_config: false,
            }))
            .await
            .map(|_| ())
            .unwrap_err(),
            api.get(Request::new(GetRequest::default()))
                .await
                .map(|_| ())
                .unwrap_err(),
            api.delete(Request::new(DeleteRequest::default()))
                .await
                .map(|_| ())
                .unwrap_err(),
            api.status(Request::new(StatusRequest::default()))
                .await
                .map(|_| ())
                .unwrap_err(),
            api.revoke(Request::new(RevokeRequest {
                kind: "identity".into(),
                value: "spiffe://cluster.local/ns/web/sa/web".into(),
                reason: String::new(),
            }))
            .await
            .map(|_| ())
            .unwrap_err(),
        ];
        for status in refused {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
            assert!(
                status.message().contains("admin client certificate"),
                "{status}"
            );
        }
        assert_eq!(store.config().version, version);
        assert!(store.config().policies.is_empty());
        assert!(store.config().revocations.is_empty());
    }

    #[test]
    fn invalid_input_is_the_callers_error_and_the_loaders_words() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = api(&dir);
        let e = store
            .apply("bad.yaml", &DENY.replace("DENY", "NOPE"))
            .unwrap_err();
        let status = status_of(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("bad.yaml:4"), "{status}");
        assert!(status.message().contains("spec.action"), "{status}");
    }

    #[test]
    fn changing_an_object_a_file_defines_is_a_failed_precondition_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = api(&dir);
        let file = (
            "/config/deny.yaml".to_owned(),
            meshward_policy::load::load_str("/config/deny.yaml", DENY),
        );
        store.sync_directory(&[file]).unwrap();
        for e in [
            store
                .delete("AuthorizationPolicy", "web", "deny")
                .unwrap_err(),
            store.apply("mine.yaml", DENY).unwrap_err(),
        ] {
            let status = status_of(e);
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert_eq!(
                status.message(),
                "AuthorizationPolicy web/deny is defined by /config/deny.yaml: edit or remove it there"
            );
        }
    }
}
