//! Credentials: the SAS connection string (parsed, its signature's expiry
//! checked up front, its secrets kept out of debug prints), the SAS tokens
//! signed from its key, and Entra ID tokens through Azure Workload Identity.
//! Apart from the adapter because three callers sign with them (the
//! browsing client, the management call and [`super::link`]), and secrets
//! are easier to keep safe in one place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Mutex;

use super::{BackendError, PROVIDER, Result};
use crate::backend::{http_client, with_root_cause};

/// What a connection string holds that dlq-bridge uses. Its `Debug` leaves
/// the key and the signature out: a debug print in a log or a panic message
/// must not carry them.
#[derive(Clone, Default, PartialEq)]
pub struct ConnectionString {
    /// The namespace host, e.g. `myns.servicebus.windows.net` (no scheme, no port).
    pub host: String,
    pub key_name: Option<String>,
    pub key: Option<String>,
    /// A pre-signed token (`SharedAccessSignature=...`).
    pub signature: Option<String>,
    /// `UseDevelopmentEmulator=true`: plain AMQP and the emulator's HTTP port.
    pub emulator: bool,
    /// `EntityPath`: the queue or topic of an entity-level policy, whose key
    /// signs only for that entity (see [`ConnectionString::check_scope`]).
    pub entity_path: Option<String>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("ConnectionString")
            .field("host", &self.host)
            .field("key_name", &self.key_name)
            .field("key", &secret(&self.key))
            .field("signature", &secret(&self.signature))
            .field("emulator", &self.emulator)
            .field("entity_path", &self.entity_path)
            .finish()
    }
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Self::default();
        for part in text.split(';') {
            let Some((k, v)) = part.split_once('=') else { continue };
            let (k, v) = (k.trim(), v.trim());
            match k.to_ascii_lowercase().as_str() {
                "endpoint" => {
                    // `sb//host` (a lost colon) read as the host `sb`, and
                    // failed as a name that does not resolve.
                    let Some((_, rest)) = v.split_once("://") else {
                        return Err(BackendError::Invalid(
                            "the Service Bus connection string's `Endpoint` is not a URL: give `Endpoint=sb://<namespace>/`"
                                .into(),
                        ));
                    };
                    let authority = rest.split(['/', '?']).next().unwrap_or_default();
                    // azservicebus dials the standard port whatever is given;
                    // one that is no port at all is a typo to say, not drop.
                    let (host, port) = authority.split_once(':').unwrap_or((authority, "443"));
                    if host.is_empty()
                        || !host
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                        || port.parse::<u16>().is_err()
                    {
                        return Err(BackendError::Invalid(format!(
                            "the Service Bus connection string's `Endpoint` host `{authority}` is not a host name or address with an optional port: give `Endpoint=sb://<namespace>.servicebus.windows.net/`"
                        )));
                    }
                    out.host = host.to_ascii_lowercase();
                }
                "sharedaccesskeyname" => out.key_name = Some(v.to_string()),
                "sharedaccesskey" => out.key = Some(v.to_string()),
                "sharedaccesssignature" => out.signature = Some(v.to_string()),
                // `maybe` read as false dialled TLS to the emulator, which
                // then failed as "cannot reach".
                "usedevelopmentemulator" => {
                    out.emulator = match v.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(BackendError::Invalid(format!(
                                "the Service Bus connection string's `UseDevelopmentEmulator={v}` is neither true nor false"
                            )));
                        }
                    }
                }
                "entitypath" => out.entity_path = Some(v.trim_matches('/').to_string()).filter(|p| !p.is_empty()),
                _ => {}
            }
        }
        if out.host.is_empty() {
            return Err(BackendError::Invalid(
                "the Service Bus connection string has no `Endpoint=sb://<namespace>`".into(),
            ));
        }
        if out.signature.is_none() && (out.key_name.is_none() || out.key.is_none()) {
            return Err(BackendError::Invalid(
                "the Service Bus connection string needs `SharedAccessKeyName` and `SharedAccessKey`, or `SharedAccessSignature`".into(),
            ));
        }
        if let Some(sig) = &out.signature {
            check_signature_expiry(sig, unix_now())?;
        }
        Ok(out)
    }

    /// The string azservicebus is given: the emulator flag removed, since
    /// plain AMQP is chosen by the client constructor.
    pub(super) fn for_client(&self) -> String {
        let mut s = format!("Endpoint=sb://{}/", self.host);
        if let Some(sig) = &self.signature {
            s.push_str(&format!(";SharedAccessSignature={sig}"));
        }
        if let (Some(n), Some(k)) = (&self.key_name, &self.key) {
            s.push_str(&format!(";SharedAccessKeyName={n};SharedAccessKey={k}"));
        }
        // azservicebus then signs its tokens for the entity, not the namespace.
        if let Some(e) = &self.entity_path {
            s.push_str(&format!(";EntityPath={e}"));
        }
        s
    }

    /// Whether this connection string may be used for `entity` (a queue or
    /// topic; `what` says for what, in the error). A policy of one entity
    /// (`EntityPath`) has a key that signs for that entity and what lies
    /// below it (its dead-letter queue, its subscriptions) only: Azure
    /// refuses its tokens for anything else (401 InvalidAudience), so the
    /// mismatch is refused here, before anything is read or sent, naming
    /// both. Names compare as Service Bus does, without regard to case.
    /// `var` names the environment variable that held the string.
    pub fn check_scope(&self, var: &str, entity: &str, what: &str) -> Result<()> {
        match &self.entity_path {
            Some(scope) if !scope.eq_ignore_ascii_case(entity.trim_matches('/')) => {
                Err(BackendError::Invalid(format!(
                    "{var} is the connection string of a policy of the entity `{scope}` (EntityPath={scope}), and {what} `{entity}`, which its key cannot sign for: use the connection string of a namespace-level policy (without EntityPath), or one of a policy of `{entity}`"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The longest a SharedAccessSignature may still be valid: azservicebus
/// schedules its refresh at the expiry on a timer that cannot reach further
/// (about 2.2 years) and panics beyond it.
const MAX_SIGNATURE_LIFETIME_SECS: u64 = 2 * 365 * 24 * 3600;

/// A SharedAccessSignature's expiry (`se=`, Unix seconds) must lie ahead, and
/// within [`MAX_SIGNATURE_LIFETIME_SECS`]: an expired one would fail every
/// call with a misleading "cannot reach", after azservicebus panicked.
fn check_signature_expiry(signature: &str, now: u64) -> Result<()> {
    let params = signature.trim_start_matches("SharedAccessSignature").trim();
    let expiry = params.split('&').find_map(|p| p.strip_prefix("se=")).ok_or_else(|| {
        BackendError::Invalid("the connection string's SharedAccessSignature has no expiry (`se=`)".into())
    })?;
    let expiry: u64 = expiry.parse().map_err(|_| {
        BackendError::Invalid(format!(
            "the connection string's SharedAccessSignature has an expiry that is not Unix seconds: se={expiry}"
        ))
    })?;
    let at = |secs: u64| {
        chrono::DateTime::from_timestamp(i64::try_from(secs).unwrap_or(i64::MAX), 0)
            .map_or_else(|| format!("{secs} (Unix seconds)"), |t| t.to_rfc3339())
    };
    if expiry <= now {
        return Err(BackendError::Invalid(format!(
            "the connection string's SharedAccessSignature expired at {}: issue a new one",
            at(expiry)
        )));
    }
    if expiry - now > MAX_SIGNATURE_LIFETIME_SECS {
        return Err(BackendError::Invalid(format!(
            "the connection string's SharedAccessSignature expires at {}, more than two years ahead, which the Service Bus client cannot schedule: issue one that expires sooner, or use SharedAccessKeyName and SharedAccessKey",
            at(expiry)
        )));
    }
    Ok(())
}

/// How the backend authenticates.
#[derive(Clone)]
pub(super) enum Auth {
    /// The connection string, and the environment variable it came from.
    Sas(ConnectionString, String),
    Entra(Arc<WorkloadIdentityCredential>),
}

/// How long before an Entra ID token expires azservicebus should renew it:
/// a sixth of a short-lived token's life (as SAS tokens are renewed), four
/// minutes of a long one. Always less than `fetch`'s five-minute cache
/// window, so the renewal fetches a new token, not the cached one.
fn renew_ahead(valid_secs: u64) -> Duration {
    if valid_secs > 600 {
        Duration::from_secs(240)
    } else {
        Duration::from_millis(valid_secs * 1000 / 6)
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A Service Bus SAS token: HMAC-SHA256 over `<url-encoded resource>\n<expiry>`.
pub fn sas_token(resource: &str, key_name: &str, key: &str, expiry: u64) -> String {
    use base64::Engine as _;
    let sr = urlencode(resource);
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
        urlencode(&sig),
        urlencode(key_name)
    )
}

/// Entra ID through Azure Workload Identity: the AKS webhook mounts a
/// federated service-account token (`AZURE_FEDERATED_TOKEN_FILE`) and sets
/// `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and `AZURE_AUTHORITY_HOST`; the token
/// is exchanged for an access token with the client-credentials grant and a
/// JWT client assertion. Implemented here against azure_core 0.25's
/// `TokenCredential` (the version azservicebus uses) with the crate-wide
/// reqwest, rather than pulling azure_identity and its HTTP stack in.
#[derive(Debug)]
pub struct WorkloadIdentityCredential {
    token_file: String,
    client_id: String,
    tenant_id: String,
    authority: String,
    http: reqwest::Client,
    cache: Mutex<HashMap<String, (String, u64)>>,
}

impl WorkloadIdentityCredential {
    pub fn from_env() -> Result<Self, String> {
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| format!("{k} is not set"))
        };
        Ok(Self {
            token_file: var("AZURE_FEDERATED_TOKEN_FILE")?,
            client_id: var("AZURE_CLIENT_ID")?,
            tenant_id: var("AZURE_TENANT_ID")?,
            authority: var("AZURE_AUTHORITY_HOST").unwrap_or_else(|_| "https://login.microsoftonline.com/".into()),
            http: http_client().map_err(|e| e.to_string())?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// An access token for `scopes`, with its expiry (unix seconds).
    /// A token endpoint that cannot be reached is unreachable (or a refused
    /// certificate); anything it answers that is not a token is a refusal.
    pub(super) async fn fetch(&self, scopes: &[&str]) -> Result<(String, u64)> {
        let refused = |detail: String| BackendError::Auth {
            provider: PROVIDER,
            detail,
        };
        let key = scopes.join(" ");
        if let Some((tok, exp)) = self.cache.lock().await.get(&key)
            && *exp > unix_now() + 300
        {
            return Ok((tok.clone(), *exp));
        }
        // Counted from before the request: the token cannot expire before
        // `requested + expires_in`, whereas a clock read after the answer
        // could put the expiry up to a second past the token's own.
        let requested = unix_now();
        let assertion = std::fs::read_to_string(&self.token_file)
            .map_err(|e| refused(format!("cannot read {}: {e}", self.token_file)))?;
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority.trim_end_matches('/'),
            self.tenant_id
        );
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("scope", key.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.trim()),
        ];
        let body: String = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let resp = self
            .http
            .post(&url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| BackendError::unreachable(url.clone(), format!("token request: {}", with_root_cause(&e))))?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await.map_err(|e| refused(format!("token response: {e}")))?;
        if !status.is_success() {
            return Err(refused(format!("token request answered {status}: {json}")));
        }
        let token = json["access_token"]
            .as_str()
            .ok_or_else(|| refused("no access_token in the token response".into()))?
            .to_string();
        let expires_in = json["expires_in"].as_u64().unwrap_or(3600);
        let exp = requested + expires_in;
        self.cache.lock().await.insert(key, (token.clone(), exp));
        Ok((token, exp))
    }
}

#[async_trait]
impl azure_core::credentials::TokenCredential for WorkloadIdentityCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        let (token, exp) = self
            .fetch(scopes)
            .await
            .map_err(|e| azure_core::Error::message(azure_core::error::ErrorKind::Credential, e.to_string()))?;
        let expires_on = azure_core::date::OffsetDateTime::from_unix_timestamp(exp as i64)
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::DataConversion, e))?;
        // azservicebus puts a link's next token when the last one expires,
        // not before, so the broker may detach the link first (a browsing
        // receiver kept by the sidecar, with the emulator's
        // `--enforce-token-expiry`): it is told of an earlier expiry.
        let early = renew_ahead(exp.saturating_sub(unix_now()));
        Ok(azure_core::credentials::AccessToken::new(token, expires_on - early))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azservicebus_is_told_of_an_entra_token_expiring_early_enough_to_renew_it() {
        // A sixth of a short life; four minutes of a long one.
        assert_eq!(renew_ahead(4), Duration::from_millis(666));
        assert_eq!(renew_ahead(600), Duration::from_secs(100));
        assert_eq!(renew_ahead(3599), Duration::from_secs(240));
        // Inside `fetch`'s cache window (5 minutes), so that the renewal
        // fetches a new token instead of getting the one it renews.
        for valid in [0, 1, 4, 60, 600, 601, 3600, 86_400] {
            assert!(renew_ahead(valid) < Duration::from_secs(300), "{valid}");
        }
    }

    #[test]
    fn connection_string_parses_and_drops_the_port() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1:5672/;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!(cs.host, "127.0.0.1");
        assert!(cs.emulator);
        assert_eq!(
            cs.for_client(),
            "Endpoint=sb://127.0.0.1/;SharedAccessKeyName=x;SharedAccessKey=y"
        );
        assert!(ConnectionString::parse("Endpoint=sb://ns.servicebus.windows.net/").is_err());
        // A lost colon is a mistake in the string (exit 2), not a host `sb`
        // that does not resolve.
        let e = ConnectionString::parse("Endpoint=sb//127.0.0.1;SharedAccessKeyName=x;SharedAccessKey=y").unwrap_err();
        assert!(matches!(e, BackendError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("`Endpoint` is not a URL"), "{e}");
        for bad in ["sb://ns .servicebus.windows.net/", "sb://ns:99999/", "sb://:5671/"] {
            let e = ConnectionString::parse(&format!("Endpoint={bad};SharedAccessKeyName=x;SharedAccessKey=y"))
                .unwrap_err();
            assert!(
                matches!(e, BackendError::Invalid(_)) && e.to_string().contains("not a host name"),
                "{bad}: {e}"
            );
        }
        // A Compose service name resolves, underscore and all.
        let cs = ConnectionString::parse(
            "Endpoint=sb://servicebus_emulator:5672;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!(cs.host, "servicebus_emulator");
        let e = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=maybe",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("`UseDevelopmentEmulator=maybe` is neither true nor false"),
            "{e}"
        );
        let cs = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=False",
        )
        .unwrap();
        assert!(!cs.emulator);
    }

    #[test]
    fn an_entity_paths_connection_string_is_for_that_entity_only() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=orders-app;SharedAccessKey=k;EntityPath=Orders",
        )
        .unwrap();
        assert_eq!(cs.entity_path.as_deref(), Some("Orders"));
        // azservicebus signs for the entity when told of it.
        assert!(cs.for_client().ends_with(";EntityPath=Orders"), "{:?}", cs.for_client());
        assert!(cs.check_scope("SB", "orders", "reads").is_ok(), "names ignore case");
        let e = cs.check_scope("SB", "invoices", "queue dlq reads").unwrap_err();
        let said = e.to_string();
        assert!(matches!(e, BackendError::Invalid(_)), "{e:?}");
        assert!(
            said.contains("EntityPath=Orders") && said.contains("`invoices`") && said.contains("namespace-level"),
            "{said}"
        );
        assert!(!said.contains("k;") && !said.contains("=k"), "{said}");
        let namespace = ConnectionString::parse("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=k").unwrap();
        assert_eq!(namespace.entity_path, None);
        assert!(namespace.check_scope("SB", "anything", "reads").is_ok());
    }

    #[test]
    fn a_debug_print_of_a_connection_string_leaves_its_secrets_out() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=s3cr3tKey=",
        )
        .unwrap();
        let printed = format!("{cs:?}");
        assert!(
            printed.contains("ns.servicebus.windows.net") && printed.contains("send"),
            "{printed}"
        );
        assert!(!printed.contains("s3cr3tKey"), "{printed}");
        let expiry = chrono::Utc::now().timestamp() + 86_400;
        let signed = ConnectionString::parse(&format!(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=s1gn4ture&se={expiry}&skn=k"
        ))
        .unwrap();
        assert!(signed.signature.is_some());
        assert!(!format!("{signed:?}").contains("s1gn4ture"));
    }

    #[test]
    fn sas_token_matches_the_documented_algorithm() {
        // HMAC-SHA256("key", "https%3A%2F%2Fns%2Fq\n1000"), base64, url-encoded.
        let t = sas_token("https://ns/q", "RootManageSharedAccessKey", "key", 1000);
        assert!(
            t.starts_with("SharedAccessSignature sr=https%3A%2F%2Fns%2Fq&sig="),
            "{t}"
        );
        assert!(t.ends_with("&se=1000&skn=RootManageSharedAccessKey"), "{t}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"https%3A%2F%2Fns%2Fq\n1000");
        use base64::Engine as _;
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert!(t.contains(&format!("sig={}", urlencode(&sig))), "{t}");
    }

    #[test]
    fn a_signature_must_expire_ahead_and_within_two_years() {
        let now = 1_800_000_000;
        let sig = |se: &str| format!("SharedAccessSignature sr=ns&sig=abc&se={se}&skn=send");
        assert!(check_signature_expiry(&sig("1800003600"), now).is_ok());
        let expired = check_signature_expiry(&sig("1"), now).unwrap_err().to_string();
        assert!(expired.contains("expired at 1970-01-01"), "{expired}");
        let far = check_signature_expiry(&sig("99999999999"), now)
            .unwrap_err()
            .to_string();
        assert!(far.contains("more than two years"), "{far}");
        assert!(check_signature_expiry("SharedAccessSignature sr=ns&sig=abc", now).is_err());
        assert!(check_signature_expiry(&sig("soon"), now).is_err());
        let cs = ConnectionString::parse(&format!("Endpoint=sb://ns.example/;SharedAccessSignature={}", sig("1")));
        assert!(cs.is_err(), "checked when the connection string is read");
    }
}
