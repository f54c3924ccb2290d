//! The age of an SQS queue's oldest message, from CloudWatch's
//! `AWS/SQS ApproximateAgeOfOldestMessage` (`sqs.cloudwatch: true`): SQS's own
//! API cannot tell it (DESIGN §2).
//!
//! One `GetMetricStatistics` call on CloudWatch's Query protocol: a form POST
//! signed with `aws-sigv4` and the SQS client's own credentials, sent with the
//! crate-wide `reqwest`, answered in XML. Not `aws-sdk-cloudwatch`: the versions
//! that share this build's smithy runtime speak smithy-rpcv2-cbor, which moto
//! 5.2.1 (the test emulator) does not serve, and a whole SDK crate for one call
//! would weigh on every build; the Query protocol is the one every CloudWatch
//! endpoint and emulator answers.

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_sqs::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use chrono::{DateTime, Utc};
use tokio::sync::Mutex;

use super::non_empty_env;
use crate::backend::{BackendError, Result};
use crate::config::SqsQueueConfig;
use crate::model::preview;

/// SQS publishes a point a minute: asking more often tells nothing new (and
/// each call is billed).
const ASK_EVERY: Duration = Duration::from_secs(60);
/// How far back a point still counts: SQS stops publishing for a queue that
/// has been inactive for hours, and a point older than this says little.
const WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(15);
const METRIC: &str = "ApproximateAgeOfOldestMessage";
/// Errors name the service the call went to, not SQS.
const PROVIDER: &str = "CloudWatch";

pub(super) struct CloudWatch {
    /// The queue's name in the config, for logs.
    name: String,
    /// `https://monitoring.REGION.amazonaws.com`, or the override.
    endpoint: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
    /// The `QueueName` dimension SQS publishes under.
    queue_name: String,
    /// The last answer and when it came, so polls within a minute reuse it.
    latest: Mutex<Option<(Instant, Option<Duration>)>>,
    /// The last failure told at `warn`, so a poll loop repeats it only at `debug`.
    last_warned: std::sync::Mutex<Option<String>>,
}

impl CloudWatch {
    pub(super) fn new(
        name: &str,
        cfg: &SqsQueueConfig,
        region: &str,
        credentials: Option<SharedCredentialsProvider>,
        queue_url: &str,
    ) -> Self {
        let endpoint = cfg
            .cloudwatch_endpoint_url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .or_else(|| non_empty_env("AWS_ENDPOINT_URL_CLOUDWATCH"))
            .or_else(|| non_empty_env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| regional_endpoint(region));
        Self {
            name: name.to_string(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: region.to_string(),
            credentials,
            queue_name: queue_url.rsplit('/').next().unwrap_or(queue_url).to_string(),
            latest: Mutex::new(None),
            last_warned: std::sync::Mutex::new(None),
        }
    }

    /// The latest age CloudWatch has, or None when it has no point in the
    /// last 15 minutes or its point says the queue was empty then. A failure
    /// is logged (once at `warn` until it changes) and the age is unknown:
    /// the depth, which SQS itself gives, still counts.
    pub(super) async fn oldest_age(&self) -> Option<Duration> {
        if let Some((at, age)) = *self.latest.lock().await
            && at.elapsed() < ASK_EVERY
        {
            return age;
        }
        match self.refresh().await {
            Ok(age) => {
                self.last_warned.lock().unwrap_or_else(|p| p.into_inner()).take();
                age
            }
            Err(e) => {
                let text = e.to_string();
                let mut warned = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
                if warned.as_deref() == Some(text.as_str()) {
                    tracing::debug!(queue = %self.name, error = %text, "the oldest age is unknown");
                } else {
                    tracing::warn!(queue = %self.name, error = %text, "the oldest age is unknown");
                    *warned = Some(text);
                }
                None
            }
        }
    }

    /// Ask CloudWatch now, and keep the answer for the polls of the next
    /// minute. A failure is returned, not logged.
    pub(super) async fn refresh(&self) -> Result<Option<Duration>> {
        let age = self.ask().await?;
        *self.latest.lock().await = Some((Instant::now(), age));
        Ok(age)
    }

    /// One `GetMetricStatistics` call: the Maximum of each minute of the last
    /// 15, the latest point kept.
    async fn ask(&self) -> Result<Option<Duration>> {
        let now = Utc::now();
        let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("Action", "GetMetricStatistics"),
                ("Version", "2010-08-01"),
                ("Namespace", "AWS/SQS"),
                ("MetricName", METRIC),
                ("Dimensions.member.1.Name", "QueueName"),
                ("Dimensions.member.1.Value", &self.queue_name),
                ("StartTime", &stamp(now - WINDOW)),
                ("EndTime", &stamp(now)),
                ("Period", "60"),
                ("Statistics.member.1", "Maximum"),
            ])
            .finish();
        let url = format!("{}/", self.endpoint);
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let signed = self.sign(&url, content_type, body.as_bytes()).await?;
        let mut req = super::super::http_client()?
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        for (name, value) in signed {
            req = req.header(name, value);
        }
        let resp = req.send().await.map_err(|e| {
            BackendError::unreachable(format!("CloudWatch at {}", self.endpoint), super::super::root_cause(&e))
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            BackendError::unreachable(format!("CloudWatch at {}", self.endpoint), super::super::root_cause(&e))
        })?;
        if !status.is_success() {
            let (code, message) = parse_error(&text);
            let detail = format!(
                "GetMetricStatistics ({METRIC} of {}): HTTP {status}: {code}: {message}",
                self.queue_name
            );
            return Err(match (status.as_u16(), code.as_str()) {
                (401 | 403, _) | (_, "AccessDenied" | "AccessDeniedException") => BackendError::Auth {
                    provider: PROVIDER,
                    detail: format!("{detail} (the role needs cloudwatch:GetMetricStatistics)"),
                },
                (
                    _,
                    "InvalidClientTokenId" | "SignatureDoesNotMatch" | "ExpiredToken" | "UnrecognizedClientException",
                ) => BackendError::Auth {
                    provider: PROVIDER,
                    detail,
                },
                _ => BackendError::Provider {
                    provider: PROVIDER,
                    detail,
                },
            });
        }
        latest_age(&text).map_err(|e| BackendError::Provider {
            provider: PROVIDER,
            detail: format!("GetMetricStatistics ({METRIC}): {e}"),
        })
    }

    /// The SigV4 headers for a POST of `body` to `url` (service `monitoring`).
    async fn sign(&self, url: &str, content_type: &str, body: &[u8]) -> Result<Vec<(String, String)>> {
        let no_credentials = |detail: String| BackendError::Auth {
            provider: PROVIDER,
            detail: format!("no credentials: {detail}"),
        };
        let provider = self
            .credentials
            .as_ref()
            .ok_or_else(|| no_credentials("the SDK's chain found none".into()))?;
        let identity = provider
            .provide_credentials()
            .await
            .map_err(|e| no_credentials(super::super::root_cause(&e)))?
            .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("monitoring")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| BackendError::Invalid(format!("cannot sign the CloudWatch call: {e}")))?
            .into();
        let request = SignableRequest::new(
            "POST",
            url,
            [("content-type", content_type)].into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| BackendError::Invalid(format!("CloudWatch endpoint `{url}`: {e}")))?;
        let (instructions, _) = sign(request, &params)
            .map_err(|e| BackendError::Invalid(format!("cannot sign the CloudWatch call: {e}")))?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// CloudWatch's regional endpoint (China's regions have their own domain).
fn regional_endpoint(region: &str) -> String {
    let domain = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("https://monitoring.{region}.{domain}")
}

/// The Maximum of the latest point of a `GetMetricStatisticsResponse`;
/// None when there is none, or it is 0 (the queue was empty then).
fn latest_age(xml: &str) -> std::result::Result<Option<Duration>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let (mut stamp, mut maximum) = (None::<String>, None::<String>);
    let mut latest: Option<(DateTime<Utc>, f64)> = None;
    let mut answered = false;
    loop {
        match reader.read_event().map_err(|e| format!("unreadable answer: {e}"))? {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                answered |= name == "GetMetricStatisticsResult";
                path.push(name);
            }
            Event::Text(t) => {
                let text = t
                    .decode()
                    .map_err(|e| format!("unreadable answer: {e}"))?
                    .trim()
                    .to_string();
                let in_point = path.len() >= 2 && path[path.len() - 2] == "member";
                match path.last().map(String::as_str) {
                    Some("Timestamp") if in_point => stamp = Some(text),
                    Some("Maximum") if in_point => maximum = Some(text),
                    _ => {}
                }
            }
            Event::End(_) => {
                if path.pop().as_deref() == Some("member")
                    && let (Some(s), Some(m)) = (stamp.take(), maximum.take())
                {
                    let at = DateTime::parse_from_rfc3339(&s)
                        .map_err(|e| format!("point time `{s}`: {e}"))?
                        .with_timezone(&Utc);
                    let value: f64 = m.parse().map_err(|e| format!("point value `{m}`: {e}"))?;
                    if latest.is_none_or(|(t, _)| at > t) {
                        latest = Some((at, value));
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !answered {
        return Err(format!("not a GetMetricStatistics answer: {}", preview(xml, 200)));
    }
    Ok(latest
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .map(|(_, v)| Duration::from_secs_f64(v)))
}

/// The `Code` and `Message` of a Query protocol error answer.
fn parse_error(xml: &str) -> (String, String) {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut current, mut code, mut message) = (None::<&str>, String::new(), String::new());
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                current = match e.local_name().as_ref() {
                    b"Code" => Some("code"),
                    b"Message" => Some("message"),
                    _ => None,
                }
            }
            Ok(Event::Text(t)) => {
                let text = t.decode().map(|s| s.trim().to_string()).unwrap_or_default();
                match current {
                    Some("code") => code = text,
                    Some("message") => message = text,
                    _ => {}
                }
            }
            Ok(Event::End(_)) => current = None,
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    if code.is_empty() && message.is_empty() {
        message = preview(xml, 200);
    }
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_point_is_the_age() {
        let xml = r#"<GetMetricStatisticsResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/">
  <GetMetricStatisticsResult>
    <Label>ApproximateAgeOfOldestMessage</Label>
    <Datapoints>
      <member><Timestamp>2026-12-05T11:02:00Z</Timestamp><Maximum>120.0</Maximum><Unit>Seconds</Unit></member>
      <member><Timestamp>2026-12-05T11:04:00Z</Timestamp><Maximum>240.0</Maximum><Unit>Seconds</Unit></member>
      <member><Timestamp>2026-12-05T11:03:00Z</Timestamp><Maximum>180.0</Maximum><Unit>Seconds</Unit></member>
    </Datapoints>
  </GetMetricStatisticsResult>
  <ResponseMetadata><RequestId>x</RequestId></ResponseMetadata>
</GetMetricStatisticsResponse>"#;
        assert_eq!(latest_age(xml), Ok(Some(Duration::from_secs(240))));
    }

    #[test]
    fn no_point_or_an_empty_queue_leaves_the_age_unknown() {
        let none = "<GetMetricStatisticsResponse><GetMetricStatisticsResult><Label>A</Label><Datapoints/></GetMetricStatisticsResult></GetMetricStatisticsResponse>";
        assert_eq!(latest_age(none), Ok(None));
        let zero = "<GetMetricStatisticsResponse><GetMetricStatisticsResult><Datapoints><member><Timestamp>2026-12-05T11:02:00Z</Timestamp><Maximum>0.0</Maximum></member></Datapoints></GetMetricStatisticsResult></GetMetricStatisticsResponse>";
        assert_eq!(latest_age(zero), Ok(None));
    }

    #[test]
    fn an_answer_of_another_kind_is_an_error_not_an_unknown_age() {
        let err = latest_age("<html>proxy login</html>").unwrap_err();
        assert!(err.contains("not a GetMetricStatistics answer"), "{err}");
        let err = latest_age("<GetMetricStatisticsResponse><GetMetricStatisticsResult><Datapoints><member><Timestamp>yesterday</Timestamp><Maximum>1</Maximum></member></Datapoints></GetMetricStatisticsResult></GetMetricStatisticsResponse>").unwrap_err();
        assert!(err.contains("yesterday"), "{err}");
    }

    #[test]
    fn query_errors_give_their_code_and_message() {
        let xml = r#"<ErrorResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User: arn:aws:sts::1:assumed-role/x is not authorized</Message></Error><RequestId>r</RequestId></ErrorResponse>"#;
        assert_eq!(
            parse_error(xml),
            (
                "AccessDenied".to_string(),
                "User: arn:aws:sts::1:assumed-role/x is not authorized".to_string()
            )
        );
        assert_eq!(parse_error("Bad Gateway").1, "Bad Gateway");
    }

    #[test]
    fn the_endpoint_is_the_regions_unless_overridden() {
        assert_eq!(
            regional_endpoint("eu-west-1"),
            "https://monitoring.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            regional_endpoint("cn-north-1"),
            "https://monitoring.cn-north-1.amazonaws.com.cn"
        );
    }
}
