//! Parsing multi-document Kubernetes YAML (and `kind: List`) into typed objects.

use k8s_openapi::api::{
    core::v1 as core, discovery::v1 as discovery, networking::v1 as networking,
};

/// One Kubernetes object of a kind weir reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<core::Service>),
    EndpointSlice(Box<discovery::EndpointSlice>),
    Node(Box<core::Node>),
    Pod(Box<core::Pod>),
    Namespace(Box<core::Namespace>),
    NetworkPolicy(Box<networking::NetworkPolicy>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Node(_) => "Node",
            Object::Pod(_) => "Pod",
            Object::Namespace(_) => "Namespace",
            Object::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    pub fn kind_id(&self) -> super::Kind {
        use super::Kind;
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
        }
    }

    /// The object's key: namespace (`default` when unset; empty for cluster-scoped
    /// kinds) and name, as `convert` names objects.
    pub fn key(&self) -> weir_core::model::ObjRef {
        let m = self.metadata();
        let ns = if self.kind_id().namespaced() {
            m.namespace.clone().unwrap_or_else(|| "default".into())
        } else {
            String::new()
        };
        weir_core::model::ObjRef::new(ns, m.name.clone().unwrap_or_default())
    }
}

/// A document that could not be read, with where it came from.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{origin}: {reason}")]
pub struct DocError {
    pub origin: String,
    pub reason: String,
}

/// Parses every document of `text`. `origin` names the file in errors. Documents of
/// kinds weir does not read are skipped silently; broken ones are reported and skipped.
pub fn parse_documents(text: &str, origin: &str) -> (Vec<Object>, Vec<DocError>) {
    let mut objs = Vec::new();
    let mut errs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = format!("{origin} (document {})", i + 1);
        let value = match serde_yaml::Value::deserialize_from(doc) {
            Ok(v) => v,
            Err(e) => {
                errs.push(DocError {
                    origin,
                    reason: format!("invalid YAML: {e}"),
                });
                // A syntax error leaves the stream unparseable (and serde_yaml's
                // iterator would yield the same error forever): stop at the first one.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        collect(value, &origin, &mut objs, &mut errs);
    }
    (objs, errs)
}

trait DeserializeFrom {
    fn deserialize_from(
        d: serde_yaml::Deserializer<'_>,
    ) -> Result<serde_yaml::Value, serde_yaml::Error>;
}

impl DeserializeFrom for serde_yaml::Value {
    fn deserialize_from(
        d: serde_yaml::Deserializer<'_>,
    ) -> Result<serde_yaml::Value, serde_yaml::Error> {
        serde::Deserialize::deserialize(d)
    }
}

fn collect(
    value: serde_yaml::Value,
    origin: &str,
    objs: &mut Vec<Object>,
    errs: &mut Vec<DocError>,
) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    fn de<T: serde::de::DeserializeOwned>(
        v: serde_yaml::Value,
    ) -> Result<Box<T>, serde_yaml::Error> {
        serde_yaml::from_value(v).map(Box::new)
    }
    let r = match kind.as_str() {
        "List" | "ServiceList" | "PodList" | "NodeList" | "NamespaceList" | "EndpointSliceList"
        | "NetworkPolicyList" => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    collect(item, origin, objs, errs);
                }
            }
            return;
        }
        "Service" => de(value).map(Object::Service),
        "EndpointSlice" => de(value).map(Object::EndpointSlice),
        "Node" => de(value).map(Object::Node),
        "Pod" => de(value).map(Object::Pod),
        "Namespace" => de(value).map(Object::Namespace),
        "NetworkPolicy" => de(value).map(Object::NetworkPolicy),
        "" => {
            errs.push(DocError {
                origin: origin.to_string(),
                reason: "document has no kind".into(),
            });
            return;
        }
        _ => return,
    };
    match r {
        Ok(o) => objs.push(o),
        Err(e) => errs.push(DocError {
            origin: origin.to_string(),
            reason: format!("{kind} {name}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_and_lists() {
        let (objs, errs) = parse_documents(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n---\nkind: List\nitems:\n- {kind: Namespace, metadata: {name: x}}\n- {kind: ConfigMap, metadata: {name: c}}\n",
            "t.yaml",
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            objs.iter().map(|o| o.kind()).collect::<Vec<_>>(),
            ["Service", "Namespace"]
        );
    }

    #[test]
    fn broken_documents_are_reported_with_origin_and_the_rest_kept() {
        let (objs, errs) = parse_documents(
            "kind: Service\nmetadata: {name: a}\nspec: {ports: 7}\n---\nkind: Namespace\nmetadata: {name: x}\n---\nfoo: [\n",
            "t.yaml",
        );
        assert_eq!(objs.len(), 1);
        assert_eq!(errs.len(), 2);
        assert!(
            errs[0]
                .to_string()
                .starts_with("t.yaml (document 1): Service a:"),
            "{}",
            errs[0]
        );
        assert!(errs[1].origin.contains("document 3"));
    }
}
