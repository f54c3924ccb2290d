//! Entra ID, as a Service Bus client on AKS meets it through Azure Workload
//! Identity: a token endpoint that exchanges a federated service-account
//! token (a JWT client assertion) for an access token, and the checks the
//! namespace makes of that access token on `$cbs` and on the ATOM endpoint.
//!
//! The token endpoint answers at `/{tenant}/oauth2/v2.0/token` on the
//! emulator's HTTP(S) listeners (a client's `AZURE_AUTHORITY_HOST`), with the
//! client-credentials grant as Microsoft's identity platform takes it. It
//! refuses what Entra refuses, with Entra's AADSTS codes: another tenant, an
//! unknown client ID, a scope other than Service Bus's, an assertion whose
//! subject or audience matches no federated credential, and one that has
//! expired. The assertion's signature is not checked (Kubernetes signs it;
//! the emulator has no issuer keys), its claims are.
//!
//! Access tokens are JWTs signed by the emulator (HS256, a key made at
//! start-up), so a token the emulator did not issue, or one altered, is
//! refused by its signature, and one that has expired by its `exp`.

use std::{sync::Arc, time::Duration};

use axum::{
    Form, Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::hmac;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::broker::now_ms;

/// The audience of a Service Bus access token, and the scope a client asks for.
pub const SERVICE_BUS_AUDIENCE: &str = "https://servicebus.azure.net";
const SERVICE_BUS_SCOPE: &str = "https://servicebus.azure.net/.default";
/// The audience Azure Workload Identity's projected token carries.
const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The one app registration the emulator knows, with its one federated credential.
#[derive(Debug, Clone)]
pub struct EntraSettings {
    pub tenant_id: String,
    pub client_id: String,
    /// The subject of the federated credential (for AKS,
    /// `system:serviceaccount:NAMESPACE:NAME`).
    pub subject: String,
    /// How long an access token lasts (Entra: 60 to 90 minutes).
    pub token_ttl: Duration,
}

pub struct Entra {
    settings: EntraSettings,
    key: hmac::Key,
}

/// Why an access token is refused, in the words Service Bus uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Invalid,
    Expired,
}

impl Refusal {
    pub fn description(self) -> &'static str {
        match self {
            Self::Invalid => "InvalidSignature: The token has an invalid signature.",
            Self::Expired => "ExpiredToken: The token is expired.",
        }
    }
}

impl Entra {
    pub fn new(settings: EntraSettings) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the system's random source");
        Self { settings, key }
    }

    /// The token endpoint, for the emulator's HTTP(S) router.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .with_state(self.clone())
    }

    fn issue(&self) -> (String, u64) {
        let now = now_ms() / 1000;
        let ttl = self.settings.token_ttl.as_secs().max(1);
        let claims = json!({
            "aud": SERVICE_BUS_AUDIENCE,
            "iss": format!("https://sts.windows.net/{}/", self.settings.tenant_id),
            "appid": self.settings.client_id,
            "tid": self.settings.tenant_id,
            "iat": now,
            "nbf": now,
            "exp": now + ttl as i64,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = hmac::sign(&self.key, signed.as_bytes());
        (format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())), ttl)
    }

    /// Checks an access token the emulator issued; returns its expiry in
    /// Unix milliseconds.
    pub fn verify(&self, token: &str) -> Result<i64, Refusal> {
        let (signed, signature) = token.rsplit_once('.').ok_or(Refusal::Invalid)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| Refusal::Invalid)?;
        hmac::verify(&self.key, signed.as_bytes(), &signature).map_err(|_| Refusal::Invalid)?;
        let claims = claims(token).ok_or(Refusal::Invalid)?;
        if claims["aud"] != SERVICE_BUS_AUDIENCE {
            return Err(Refusal::Invalid);
        }
        let expires = claims["exp"].as_i64().ok_or(Refusal::Invalid)?.saturating_mul(1000);
        if expires <= now_ms() {
            return Err(Refusal::Expired);
        }
        Ok(expires)
    }

    /// Checks the federated assertion as Entra matches it to the app's
    /// federated credential: audience, subject, then time.
    fn check_assertion(&self, assertion: &str) -> Result<(), (StatusCode, &'static str, String)> {
        let unauthorized = |code: &'static str, text: String| (StatusCode::UNAUTHORIZED, code, text);
        let claims = claims(assertion).ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "AADSTS50027: JWT token is invalid or malformed.".to_string(),
            )
        })?;
        let issuer = claims["iss"].as_str().unwrap_or_default();
        let audience_matches = match &claims["aud"] {
            Value::String(a) => a == TOKEN_EXCHANGE_AUDIENCE,
            Value::Array(all) => all.iter().any(|a| a == TOKEN_EXCHANGE_AUDIENCE),
            _ => false,
        };
        if !audience_matches {
            return Err(unauthorized(
                "invalid_client",
                format!(
                    "AADSTS700212: No matching federated identity record found for presented assertion audience '{}'.",
                    claims["aud"]
                ),
            ));
        }
        let subject = claims["sub"].as_str().unwrap_or_default();
        if subject != self.settings.subject {
            return Err(unauthorized(
                "invalid_client",
                format!(
                    "AADSTS70021: No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'."
                ),
            ));
        }
        let now = now_ms() / 1000;
        match claims["exp"].as_i64() {
            Some(exp) if exp > now => Ok(()),
            _ => Err(unauthorized(
                "invalid_client",
                "AADSTS700024: Client assertion is not within its valid time range.".to_string(),
            )),
        }
    }
}

/// The claims of a JWT, without checking its signature.
fn claims(jwt: &str) -> Option<Value> {
    let mut parts = jwt.trim().split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

#[derive(Debug, Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    scope: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
}

fn error(status: StatusCode, code: &str, description: String) -> Response {
    (status, Json(json!({ "error": code, "error_description": description }))).into_response()
}

async fn token(State(entra): State<Arc<Entra>>, Path(tenant): Path<String>, Form(req): Form<TokenRequest>) -> Response {
    let settings = &entra.settings;
    if tenant != settings.tenant_id {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("AADSTS90002: Tenant '{tenant}' not found."),
        );
    }
    if req.grant_type.as_deref() != Some("client_credentials") {
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.".into(),
        );
    }
    let client_id = req.client_id.unwrap_or_default();
    if client_id != settings.client_id {
        return error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            format!("AADSTS700016: Application with identifier '{client_id}' was not found in the directory."),
        );
    }
    let scope = req.scope.unwrap_or_default();
    if scope != SERVICE_BUS_SCOPE {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("AADSTS70011: The provided value for the input parameter 'scope' is not valid: '{scope}'."),
        );
    }
    if req.client_assertion_type.as_deref() != Some(ASSERTION_TYPE) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'."
                .into(),
        );
    }
    if let Err((status, code, description)) = entra.check_assertion(req.client_assertion.as_deref().unwrap_or("")) {
        tracing::info!(%description, "token request refused");
        return error(status, code, description);
    }
    let (access_token, ttl) = entra.issue();
    tracing::debug!(ttl, "access token issued");
    Json(json!({
        "token_type": "Bearer",
        "expires_in": ttl,
        "ext_expires_in": ttl,
        "access_token": access_token,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entra(ttl: Duration) -> Entra {
        Entra::new(EntraSettings {
            tenant_id: "t".into(),
            client_id: "c".into(),
            subject: "system:serviceaccount:apps:orders".into(),
            token_ttl: ttl,
        })
    }

    fn assertion(claims: Value) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[test]
    fn an_issued_token_verifies_and_an_altered_or_foreign_one_does_not() {
        let e = entra(Duration::from_secs(60));
        let (token, ttl) = e.issue();
        assert_eq!(ttl, 60);
        let expires = e.verify(&token).expect("its own token");
        assert!((expires - now_ms() - 60_000).abs() < 2_000, "{expires}");
        let mut altered = token.clone().into_bytes();
        let at = token.find('.').unwrap() + 3;
        altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
        assert_eq!(e.verify(std::str::from_utf8(&altered).unwrap()), Err(Refusal::Invalid));
        assert_eq!(entra(Duration::from_secs(60)).verify(&token), Err(Refusal::Invalid));
        assert_eq!(e.verify("not a jwt"), Err(Refusal::Invalid));
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let e = entra(Duration::from_secs(1));
        let (token, _) = e.issue();
        std::thread::sleep(Duration::from_millis(2_100));
        assert_eq!(e.verify(&token), Err(Refusal::Expired));
    }

    #[test]
    fn an_assertion_must_match_the_federated_credential() {
        let e = entra(Duration::from_secs(60));
        let exp = now_ms() / 1000 + 600;
        let good = json!({"iss": "https://oidc", "sub": "system:serviceaccount:apps:orders", "aud": [TOKEN_EXCHANGE_AUDIENCE], "exp": exp});
        assert!(e.check_assertion(&assertion(good.clone())).is_ok());
        let mut other = good.clone();
        other["sub"] = json!("system:serviceaccount:apps:billing");
        let (status, _, text) = e.check_assertion(&assertion(other)).unwrap_err();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(text.starts_with("AADSTS70021"), "{text}");
        let mut audience = good.clone();
        audience["aud"] = json!("api://elsewhere");
        assert!(
            e.check_assertion(&assertion(audience))
                .unwrap_err()
                .2
                .starts_with("AADSTS700212")
        );
        let mut expired = good;
        expired["exp"] = json!(exp - 1_200);
        assert!(
            e.check_assertion(&assertion(expired))
                .unwrap_err()
                .2
                .starts_with("AADSTS700024")
        );
        assert!(e.check_assertion("garbage").unwrap_err().2.starts_with("AADSTS50027"));
    }
}
