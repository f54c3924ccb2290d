//! Shared access signatures checked as Azure checks them, against the
//! namespace's authorization rules (`--sas-rule`): the signature, the
//! expiry, the resource the token covers, and the rights (claims) of the
//! rule that signed it. Without rules, SAS tokens are taken unchecked.
//!
//! A token is `SharedAccessSignature sr=<url-encoded resource>&sig=<url-encoded
//! base64 HMAC-SHA256>&se=<unix seconds>&skn=<rule>`, signed over the
//! url-encoded resource, a newline and the expiry, with the rule's key (its
//! text's bytes).

use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use percent_encoding::percent_decode_str;
use ring::hmac;

use crate::broker::{address, now_ms};

/// What a rule (and so a token it signed) allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights {
    pub listen: bool,
    pub send: bool,
    pub manage: bool,
}

impl Rights {
    /// What Azure's `RootManageSharedAccessKey` (and an unchecked token) has.
    pub const ALL: Self = Self {
        listen: true,
        send: true,
        manage: true,
    };
}

/// One right, as Azure names its claim in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    Listen,
    Send,
    Manage,
}

impl Right {
    pub fn granted_by(self, rights: Rights) -> bool {
        match self {
            Self::Listen => rights.listen,
            Self::Send => rights.send,
            // A Manage rule has Listen and Send too, on Azure.
            Self::Manage => rights.manage,
        }
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Listen => "Listen",
            Self::Send => "Send",
            Self::Manage => "Manage",
        })
    }
}

#[derive(Debug, Clone)]
pub struct SasRule {
    name: String,
    key: String,
    rights: Rights,
    /// The queue or topic an entity-level rule belongs to (its path, lower
    /// case); None: a rule of the namespace.
    entity: Option<String>,
}

impl SasRule {
    /// `NAME=KEY` (every right, as a namespace's root rule) or
    /// `NAME=KEY:Listen,Send` (any of Listen, Send, Manage; Manage implies
    /// the other two, as on Azure).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=KEY[:Listen,Send,Manage], got {spec:?}"))?;
        let (key, rights) = match rest.rsplit_once(':') {
            None => (rest, Rights::ALL),
            Some((key, list)) => {
                let mut rights = Rights {
                    listen: false,
                    send: false,
                    manage: false,
                };
                for right in list.split(',').map(str::trim) {
                    match right.to_ascii_lowercase().as_str() {
                        "listen" => rights.listen = true,
                        "send" => rights.send = true,
                        "manage" => rights = Rights::ALL,
                        other => return Err(format!("unknown right {other:?} in {spec:?}: use Listen, Send, Manage")),
                    }
                }
                (key, rights)
            }
        };
        if name.is_empty() || key.is_empty() {
            return Err(format!("expected NAME=KEY[:Listen,Send,Manage], got {spec:?}"));
        }
        Ok(Self {
            name: name.to_string(),
            key: key.to_string(),
            rights,
            entity: None,
        })
    }

    /// `ENTITY:NAME=KEY[:RIGHTS]`: a rule of the queue or topic ENTITY, as
    /// Azure's portal creates under an entity's "Shared access policies"
    /// (its connection string carries `EntityPath=ENTITY`). Its tokens are
    /// valid only for a resource at or below that entity.
    pub fn parse_entity(spec: &str) -> Result<Self, String> {
        let (entity, rule) = spec
            .split_once(':')
            .ok_or_else(|| format!("expected ENTITY:NAME=KEY[:Listen,Send,Manage], got {spec:?}"))?;
        let entity = address::path_of(entity);
        if entity.is_empty() {
            return Err(format!("expected ENTITY:NAME=KEY[:Listen,Send,Manage], got {spec:?}"));
        }
        Ok(Self {
            entity: Some(entity),
            ..Self::parse(rule)?
        })
    }
}

/// A token that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The path it covers (lower case, no scheme or host; empty: the namespace).
    pub resource: String,
    /// Unix milliseconds.
    pub expires: i64,
    pub rights: Rights,
}

/// The namespace's authorization rules.
#[derive(Debug, Clone)]
pub struct SasRules(Vec<SasRule>);

impl SasRules {
    pub fn new(rules: Vec<SasRule>) -> Self {
        Self(rules)
    }

    /// Checks `token` as Azure does; the refusal is Azure's description.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let malformed = || "InvalidSignature: The token has an invalid signature.".to_string();
        let fields = token.trim().strip_prefix("SharedAccessSignature ").ok_or_else(|| {
            "MalformedToken: The credentials contained in the authorization header are not in the WRAP format."
                .to_string()
        })?;
        let field = |name: &str| {
            fields
                .split('&')
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        };
        let (Some(sr), Some(sig), Some(se), Some(skn)) = (field("sr"), field("sig"), field("se"), field("skn")) else {
            return Err(malformed());
        };
        let decode = |v: &str| percent_decode_str(v).decode_utf8_lossy().into_owned();
        let skn = decode(skn);
        let rule = self.0.iter().find(|r| r.name == skn).ok_or_else(|| {
            format!("InvalidSignature: The token has an invalid signature. No authorization rule named '{skn}'.")
        })?;
        let signature = STANDARD.decode(decode(sig)).map_err(|_| malformed())?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, rule.key.as_bytes());
        hmac::verify(&key, format!("{sr}\n{se}").as_bytes(), &signature).map_err(|_| malformed())?;
        let expires = se.parse::<i64>().map_err(|_| malformed())?.saturating_mul(1000);
        if expires <= now_ms() {
            return Err("ExpiredToken: The token is expired.".into());
        }
        let resource = address::path_of(&decode(sr));
        if let Some(entity) = &rule.entity
            && !address::token_covers(entity, &resource)
        {
            // An entity's key signs for that entity only: a token it signed
            // for the namespace (or another entity) is refused.
            return Err(format!(
                "InvalidAudience: The authorization header contains a token with a wrong audience. The rule '{skn}' belongs to '{entity}'; the token was signed for '{}'.",
                if resource.is_empty() {
                    "the namespace"
                } else {
                    &resource
                }
            ));
        }
        Ok(Verified {
            resource,
            expires,
            rights: rule.rights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Signed as the SDKs sign (Python's `generate_sas_token`, dlq-bridge's `sas_token`).
    fn sign(resource: &str, rule: &str, key: &str, expiry: i64) -> String {
        let sr: String =
            percent_encoding::utf8_percent_encode(resource, percent_encoding::NON_ALPHANUMERIC).to_string();
        let key = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
        let sig = STANDARD.encode(hmac::sign(&key, format!("{sr}\n{expiry}").as_bytes()).as_ref());
        let sig: String = percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC).to_string();
        format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={rule}")
    }

    fn rules() -> SasRules {
        SasRules::new(vec![
            SasRule::parse("root=k1").unwrap(),
            SasRule::parse("app=k2:Listen,Send").unwrap(),
        ])
    }

    #[test]
    fn a_token_checks_out_with_its_rules_rights_and_resource() {
        let later = now_ms() / 1000 + 600;
        let v = rules()
            .verify(&sign("amqps://ns.example/Orders", "app", "k2", later))
            .unwrap();
        assert_eq!(v.resource, "orders");
        assert_eq!(v.expires, later * 1000);
        assert!(v.rights.listen && v.rights.send && !v.rights.manage);
        let v = rules().verify(&sign("sb://ns.example/", "root", "k1", later)).unwrap();
        assert_eq!((v.resource.as_str(), v.rights), ("", Rights::ALL));
    }

    #[test]
    fn a_wrong_key_an_unknown_rule_an_expired_or_mangled_token_is_refused() {
        let later = now_ms() / 1000 + 600;
        let refused = |token: &str| rules().verify(token).unwrap_err();
        assert!(refused(&sign("sb://ns/q", "app", "wrong", later)).starts_with("InvalidSignature"));
        assert!(refused(&sign("sb://ns/q", "nobody", "k2", later)).contains("No authorization rule named 'nobody'"));
        assert!(refused(&sign("sb://ns/q", "app", "k2", now_ms() / 1000 - 1)).starts_with("ExpiredToken"));
        let good = sign("sb://ns/q", "app", "k2", later);
        assert!(refused(&good.replace("sb%3A%2F%2Fns%2Fq", "sb%3A%2F%2Fns%2Fother")).starts_with("InvalidSignature"));
        assert!(refused("Bearer abc").starts_with("MalformedToken"));
    }

    #[test]
    fn an_entity_rule_signs_for_its_entity_and_below_only() {
        let later = now_ms() / 1000 + 600;
        let rules = SasRules::new(vec![SasRule::parse_entity("Orders:orders-app=k3:Listen").unwrap()]);
        let v = rules
            .verify(&sign("sb://ns.example/orders", "orders-app", "k3", later))
            .unwrap();
        assert_eq!(v.resource, "orders");
        assert!(v.rights.listen && !v.rights.send);
        assert!(
            rules
                .verify(&sign("amqp://ns/orders/$DeadLetterQueue", "orders-app", "k3", later))
                .is_ok()
        );
        for outside in [
            "sb://ns.example/",
            "sb://ns.example/orders-2",
            "sb://ns.example/invoices",
        ] {
            let refusal = rules.verify(&sign(outside, "orders-app", "k3", later)).unwrap_err();
            assert!(refusal.starts_with("InvalidAudience"), "{outside}: {refusal}");
        }
        assert!(SasRule::parse_entity("orders-app=k3").is_err());
        assert!(SasRule::parse_entity(":a=b").is_err());
    }

    #[test]
    fn rules_parse_with_their_rights() {
        assert_eq!(SasRule::parse("a=b").unwrap().rights, Rights::ALL);
        let listen = SasRule::parse("a=b:Listen").unwrap().rights;
        assert!(listen.listen && !listen.send && !listen.manage);
        assert_eq!(SasRule::parse("a=b:manage").unwrap().rights, Rights::ALL);
        assert!(SasRule::parse("a=b:Read").is_err());
        assert!(SasRule::parse("nokey").is_err());
        assert!(SasRule::parse("=k").is_err());
    }
}
