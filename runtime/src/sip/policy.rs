//! Who may reach the agent over SIP, and where it may call: the destination allow-list (no toll
//! fraud) and digest authentication of callers (no account enumeration). Sans-I/O: the time is
//! passed in.
//!
//! Toll fraud on a SIP server is someone else making it place calls they do not pay for. talkline
//! places calls in three ways only: `talkline call URI`, REFER to `--sip-transfer-to`, and
//! answering an INVITE. A peer's own REFER is never followed (405), so a caller cannot make the
//! agent dial out. With `--sip-allow` set, all three must name a destination on the list: an
//! INVITE to any other request URI is answered 403 (a misrouted or probing call, such as
//! `sip:0090...@` aimed at a gateway), and an outbound call or transfer elsewhere is refused before
//! anything is sent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::digest::{self, Algorithm};

/// A nonce older than this is refused with `stale=true`: the caller's user agent answers the
/// fresh one without asking its user again.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(300);

/// `--sip-allow`: the destinations calls may go to or be addressed to. Empty: any.
#[derive(Debug, Clone, Default)]
pub struct DestinationAllowList {
    /// `user@host` patterns, lower-cased, `*` matching any run of characters.
    patterns: Vec<String>,
}

impl DestinationAllowList {
    /// Each pattern is `[sip:]user@host[:port]` with `*` wildcards, e.g. `agent@*`,
    /// `sip:+1555*@trunk.example`.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let target = destination(p);
                if target.contains('@') {
                    Ok(target)
                } else {
                    Err(format!("--sip-allow {p:?}: expected user@host, e.g. agent@* or sip:+1555*@trunk.example"))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `uri` (a `sip:`/`sips:` URI, with or without `<>`, parameters and headers) may
    /// be called or answered.
    pub fn allows(&self, uri: &str) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        let target = destination(uri);
        self.patterns.iter().any(|p| glob_match(p, &target))
    }
}

/// `user@host[:port]` of a URI, lower-cased, without scheme, parameters or headers. A
/// destination with no user part keeps just the host, which no `user@host` pattern matches.
fn destination(uri: &str) -> String {
    let uri = uri.trim().trim_start_matches('<');
    let uri = uri.split('>').next().unwrap_or_default();
    let lower = uri.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("sips:")
        .or_else(|| lower.strip_prefix("sip:"))
        .unwrap_or(&lower);
    let (user, host) = match rest.rsplit_once('@') {
        Some((user, host)) => (Some(user), host),
        None => (None, rest),
    };
    let host = host.split([';', '?']).next().unwrap_or_default();
    match user {
        // A user's own parameters (`;phone-context=`) are not part of who is called.
        Some(user) => format!("{}@{host}", user.split(';').next().unwrap_or_default()),
        None => host.to_string(),
    }
}

/// Wildcard match where `*` is any run of characters (including none). Iterative with one
/// backtrack point: linear in practice, no recursion on attacker-chosen input.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_p, star_t)) = star {
            pi = star_p + 1;
            ti = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// What a caller's INVITE gets from [`CallerAuth::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Right credentials for this user.
    Authorized { user: String },
    /// 401 with these `WWW-Authenticate` values: no credentials, wrong ones, an unknown user
    /// (exactly as a wrong password), or (`stale=true`) right ones on an expired nonce.
    Challenge(Vec<String>),
}

/// Digest authentication of callers (`--sip-auth-users`). Nonces are stateless: the time they
/// were issued and an HMAC of it, so a flood of unanswered INVITEs costs no memory.
///
/// No account enumeration: an unknown user gets the same 401 as a wrong password, after the
/// same work (a digest is computed against a fixed dummy password) and a constant-time compare.
pub struct CallerAuth {
    realm: String,
    /// User name -> password. Not `Debug`.
    users: HashMap<String, String>,
    key: [u8; 32],
    /// Nonces carry their age relative to this instant.
    epoch: Instant,
}

/// Compared against when the user is unknown, so that case costs what a wrong password costs.
const DUMMY_PASSWORD: &str = "talkline-no-such-user";

impl CallerAuth {
    /// `key`: random bytes, fresh per process (nonces from an earlier run are then simply stale).
    pub fn new(realm: &str, users: HashMap<String, String>, key: [u8; 32], epoch: Instant) -> Self {
        Self {
            realm: realm.to_string(),
            users,
            key,
            epoch,
        }
    }

    /// Reads `user:password` lines (`#` comments and blank lines skipped).
    pub fn parse_users(text: &str) -> Result<HashMap<String, String>, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, password)) = line.split_once(':') else {
                return Err(format!("line {}: expected user:password", n + 1));
            };
            if user.is_empty() || password.is_empty() {
                return Err(format!("line {}: empty user or password", n + 1));
            }
            users.insert(user.to_string(), password.to_string());
        }
        if users.is_empty() {
            return Err("no user:password line".into());
        }
        Ok(users)
    }

    /// Checks an INVITE's `Authorization` (if any) against its request URI.
    pub fn check(
        &self,
        now: Instant,
        method: &str,
        request_uri: &str,
        authorization: Option<&str>,
    ) -> Verdict {
        let Some(credentials) = authorization.and_then(digest::parse_authorization) else {
            return self.challenge(now, false);
        };
        let password = self.users.get(&credentials.username);
        let expected = digest::expected_response(
            &credentials,
            method,
            password.map_or(DUMMY_PASSWORD, String::as_str),
        );
        let digest_ok: bool = expected
            .as_bytes()
            .ct_eq(credentials.response.as_bytes())
            .into();
        let nonce_age = self.nonce_age(now, &credentials.nonce);
        let right = password.is_some()
            && digest_ok
            && credentials.realm == self.realm
            && credentials.uri == request_uri
            && nonce_age.is_some();
        match nonce_age {
            Some(age) if right && age <= NONCE_LIFETIME => Verdict::Authorized {
                user: credentials.username,
            },
            Some(_) if right => self.challenge(now, true),
            _ => self.challenge(now, false),
        }
    }

    /// Both algorithms, SHA-256 first (RFC 8760 section 2.4: the preferred one first).
    fn challenge(&self, now: Instant, stale: bool) -> Verdict {
        let nonce = self.nonce(now);
        Verdict::Challenge(
            [Algorithm::Sha256, Algorithm::Md5]
                .into_iter()
                .map(|alg| digest::challenge_header(&self.realm, &nonce, alg, stale))
                .collect(),
        )
    }

    fn nonce(&self, now: Instant) -> String {
        let issued = now.saturating_duration_since(self.epoch).as_millis() as u64;
        format!("{issued:x}.{}", self.mac(issued))
    }

    /// The age of a nonce we issued; `None` for one we did not (forged or from another run).
    fn nonce_age(&self, now: Instant, nonce: &str) -> Option<Duration> {
        let (issued, mac) = nonce.split_once('.')?;
        let issued = u64::from_str_radix(issued, 16).ok()?;
        let ours: bool = self.mac(issued).as_bytes().ct_eq(mac.as_bytes()).into();
        if !ours {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.epoch).as_millis() as u64;
        Some(Duration::from_millis(elapsed.saturating_sub(issued)))
    }

    fn mac(&self, issued: u64) -> String {
        // HMAC-SHA256 accepts keys of any length: new_from_slice cannot fail on 32 bytes.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(&issued.to_be_bytes());
        mac.finalize().into_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(patterns: &[&str]) -> DestinationAllowList {
        DestinationAllowList::new(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    #[test]
    fn an_empty_allow_list_allows_everything() {
        assert!(allow(&[]).allows("sip:00900123@gw.example"));
    }

    #[test]
    fn the_allow_list_matches_user_and_host_with_wildcards() {
        let list = allow(&[
            "agent@*",
            "sip:+1555*@trunk.example",
            "nurse@clinic.example:5060",
        ]);
        let cases = [
            ("sip:agent@127.0.0.1:5060", true),
            ("<sip:Agent@pbx.example;transport=udp>", true),
            ("sip:+15551234567@trunk.example", true),
            ("sip:+15551234567;phone-context=x@trunk.example", true),
            ("sips:+15551234567@trunk.example?subject=x", true),
            ("sip:+449001234567@trunk.example", false),
            ("sip:+15551234567@other.example", false),
            ("sip:nurse@clinic.example:5060", true),
            ("sip:nurse@clinic.example", false),
            ("sip:trunk.example", false),
            ("sip:agentsmith@x", false),
            ("", false),
        ];
        for (uri, expected) in cases {
            assert_eq!(list.allows(uri), expected, "{uri}");
        }
    }

    #[test]
    fn an_allow_list_pattern_needs_a_user_and_a_host() {
        assert!(DestinationAllowList::new(&["trunk.example".into()]).is_err());
    }

    #[test]
    fn glob_matching_is_linear_on_hostile_patterns() {
        let text = "a".repeat(10_000);
        assert!(!glob_match("*a*a*a*a*a*b", &text));
        assert!(glob_match("*a*a*a*a*a*", &text));
    }

    fn auth(t0: Instant) -> CallerAuth {
        let users =
            CallerAuth::parse_users("# callers\nalice:wonderland\n\nbob:builder\n").unwrap();
        CallerAuth::new("talkline", users, [7; 32], t0)
    }

    /// What a caller's user agent answers to our first challenge.
    fn answer(challenge: &str, user: &str, password: &str, uri: &str) -> String {
        let challenge = digest::parse_challenge(challenge).unwrap();
        digest::authorization(
            &challenge,
            &digest::Request {
                method: "INVITE",
                uri,
                username: user,
                password,
                cnonce: "0a4f113b",
                nc: 1,
            },
        )
    }

    fn challenges(v: Verdict) -> Vec<String> {
        match v {
            Verdict::Challenge(c) => c,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    const URI: &str = "sip:agent@127.0.0.1:5060";

    #[test]
    fn right_credentials_pass_with_either_algorithm() {
        let t0 = Instant::now();
        let auth = auth(t0);
        let offered = challenges(auth.check(t0, "INVITE", URI, None));
        assert_eq!(offered.len(), 2);
        assert!(offered[0].contains("algorithm=SHA-256"));
        for challenge in &offered {
            let value = answer(challenge, "alice", "wonderland", URI);
            assert_eq!(
                auth.check(t0 + Duration::from_secs(1), "INVITE", URI, Some(&value)),
                Verdict::Authorized {
                    user: "alice".into()
                }
            );
        }
    }

    #[test]
    fn an_unknown_user_is_answered_exactly_like_a_wrong_password() {
        let t0 = Instant::now();
        let auth = auth(t0);
        let challenge = &challenges(auth.check(t0, "INVITE", URI, None))[0];
        let t1 = t0 + Duration::from_secs(2);
        let wrong_password = answer(challenge, "alice", "guess", URI);
        let unknown_user = answer(challenge, "mallory", "guess", URI);
        let a = challenges(auth.check(t1, "INVITE", URI, Some(&wrong_password)));
        let b = challenges(auth.check(t1, "INVITE", URI, Some(&unknown_user)));
        assert_eq!(a, b);
        assert!(!a[0].contains("stale"));
    }

    #[test]
    fn a_forged_or_replayed_elsewhere_answer_is_challenged() {
        let t0 = Instant::now();
        let auth = auth(t0);
        let challenge = &challenges(auth.check(t0, "INVITE", URI, None))[0];
        // Another request URI than the one answered for.
        let other_uri = answer(challenge, "alice", "wonderland", "sip:agent@elsewhere");
        assert!(matches!(
            auth.check(t0, "INVITE", URI, Some(&other_uri)),
            Verdict::Challenge(_)
        ));
        // A nonce we never issued.
        let forged = challenge.replace("nonce=\"", "nonce=\"1");
        let forged = answer(&forged, "alice", "wonderland", URI);
        assert!(matches!(
            auth.check(t0, "INVITE", URI, Some(&forged)),
            Verdict::Challenge(_)
        ));
        // Garbage.
        assert!(matches!(
            auth.check(t0, "INVITE", URI, Some("Basic YWxpY2U6eA==")),
            Verdict::Challenge(_)
        ));
    }

    #[test]
    fn right_credentials_on_an_old_nonce_get_a_stale_challenge() {
        let t0 = Instant::now();
        let auth = auth(t0);
        let challenge = &challenges(auth.check(t0, "INVITE", URI, None))[0];
        let value = answer(challenge, "bob", "builder", URI);
        let late = t0 + NONCE_LIFETIME + Duration::from_secs(1);
        let again = challenges(auth.check(late, "INVITE", URI, Some(&value)));
        assert!(again[0].contains("stale=true"));
        // A wrong password on an old nonce is not told the nonce was the only problem.
        let wrong = answer(challenge, "bob", "x", URI);
        assert!(!challenges(auth.check(late, "INVITE", URI, Some(&wrong)))[0].contains("stale"));
    }

    #[test]
    fn the_users_file_is_checked() {
        assert!(CallerAuth::parse_users("alice\n").is_err());
        assert!(CallerAuth::parse_users("# nothing\n").is_err());
        assert!(CallerAuth::parse_users(":x\n").is_err());
    }
}
