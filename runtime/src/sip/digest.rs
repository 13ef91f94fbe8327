//! HTTP digest authentication as SIP uses it (RFC 3261 section 22, RFC 8760): the registrar's
//! `WWW-Authenticate`/`Proxy-Authenticate` challenge in, our `Authorization` answer out. MD5 and
//! SHA-256, with `qop=auth` (cnonce, nc) when offered and the RFC 2069 form when not. `auth-int`
//! and the `-sess` variants are not offered by the registrars we target and are refused.

use md5::Md5;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    fn hash(self, text: &str) -> String {
        match self {
            Algorithm::Md5 => hex(&Md5::digest(text.as_bytes())),
            Algorithm::Sha256 => hex(&Sha256::digest(text.as_bytes())),
        }
    }
}

/// One `Digest` challenge, as far as we answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    /// The server offered `qop=auth`.
    pub qop_auth: bool,
    /// `stale=true`: our credentials were right, only the nonce expired.
    pub stale: bool,
}

/// Parses a `Digest realm="...", nonce="...", ...` header value; `None` for another scheme, a
/// missing realm or nonce, or an algorithm we do not implement.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let rest = value.trim();
    let (scheme, params) = rest.split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("digest") {
        return None;
    }
    let (mut realm, mut nonce, mut opaque, mut qop, mut algorithm, mut stale) =
        (None, None, None, None, None, false);
    for (name, value) in params_of(params) {
        match name.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value),
            "nonce" => nonce = Some(value),
            "opaque" => opaque = Some(value),
            "qop" => qop = Some(value),
            "algorithm" => algorithm = Some(value),
            "stale" => stale = value.eq_ignore_ascii_case("true"),
            _ => {}
        }
    }
    let algorithm = match algorithm.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("MD5") => Algorithm::Md5,
        Some("SHA-256") => Algorithm::Sha256,
        Some(_) => return None,
    };
    let qop_auth = match qop {
        // The server insists on a protection we do not do (auth-int only).
        Some(q) if !q.split(',').any(|o| o.trim().eq_ignore_ascii_case("auth")) => return None,
        Some(_) => true,
        None => false,
    };
    Some(Challenge {
        realm: realm?,
        nonce: nonce?,
        opaque,
        algorithm,
        qop_auth,
        stale,
    })
}

/// A caller's `Authorization: Digest ...` answer to our challenge, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Algorithm,
    /// `qop=auth` with its `nc` and `cnonce`; `None`: the RFC 2069 form.
    pub qop_auth: Option<(u32, String)>,
}

/// Parses an `Authorization` value; `None` for another scheme, a missing field or an algorithm
/// or protection we do not implement (such an answer is challenged again, like a wrong one).
pub fn parse_authorization(value: &str) -> Option<Credentials> {
    let (scheme, params) = value.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("digest") {
        return None;
    }
    let (mut username, mut realm, mut nonce, mut uri, mut response) =
        (None, None, None, None, None);
    let (mut algorithm, mut qop, mut nc, mut cnonce) = (Algorithm::Md5, None, None, None);
    for (name, value) in params_of(params) {
        match name.to_ascii_lowercase().as_str() {
            "username" => username = Some(value),
            "realm" => realm = Some(value),
            "nonce" => nonce = Some(value),
            "uri" => uri = Some(value),
            "response" => response = Some(value.to_ascii_lowercase()),
            "algorithm" => {
                algorithm = match value.to_ascii_uppercase().as_str() {
                    "MD5" => Algorithm::Md5,
                    "SHA-256" => Algorithm::Sha256,
                    _ => return None,
                }
            }
            "qop" => qop = Some(value),
            "nc" => nc = u32::from_str_radix(&value, 16).ok(),
            "cnonce" => cnonce = Some(value),
            _ => {}
        }
    }
    let qop_auth = match qop {
        None => None,
        Some(q) if q.eq_ignore_ascii_case("auth") => Some((nc?, cnonce?)),
        Some(_) => return None,
    };
    Some(Credentials {
        username: username?,
        realm: realm?,
        nonce: nonce?,
        uri: uri?,
        response: response?,
        algorithm,
        qop_auth,
    })
}

/// The `response` a caller with `password` would have sent in `credentials` for `method`.
pub fn expected_response(credentials: &Credentials, method: &str, password: &str) -> String {
    let challenge = Challenge {
        realm: credentials.realm.clone(),
        nonce: credentials.nonce.clone(),
        opaque: None,
        algorithm: credentials.algorithm,
        qop_auth: credentials.qop_auth.is_some(),
        stale: false,
    };
    let (nc, cnonce) = match &credentials.qop_auth {
        Some((nc, cnonce)) => (*nc, cnonce.as_str()),
        None => (0, ""),
    };
    response(
        &challenge,
        &Request {
            method,
            uri: &credentials.uri,
            username: &credentials.username,
            password,
            cnonce,
            nc,
        },
    )
}

/// The `WWW-Authenticate` value of our challenge.
pub fn challenge_header(realm: &str, nonce: &str, algorithm: Algorithm, stale: bool) -> String {
    let stale = if stale { ", stale=true" } else { "" };
    format!(
        "Digest realm=\"{}\", nonce=\"{}\", algorithm={}, qop=\"auth\"{stale}",
        quote(realm),
        quote(nonce),
        algorithm.name()
    )
}

/// `name=value` or `name="quoted, value"` pairs separated by commas. Backslash escapes in quoted
/// strings are honoured.
fn params_of(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let name: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_string();
        if name.is_empty() {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        out.push((name, value));
    }
}

/// What the answer covers besides the challenge.
pub struct Request<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    pub username: &'a str,
    pub password: &'a str,
    /// Ours, fresh per answer when `qop=auth` is used.
    pub cnonce: &'a str,
    /// How many times this nonce has been answered, from 1.
    pub nc: u32,
}

/// The `response` value (RFC 7616 section 3.4.1; RFC 2069 without qop).
pub fn response(challenge: &Challenge, request: &Request<'_>) -> String {
    let alg = challenge.algorithm;
    let ha1 = alg.hash(&format!(
        "{}:{}:{}",
        request.username, challenge.realm, request.password
    ));
    let ha2 = alg.hash(&format!("{}:{}", request.method, request.uri));
    if challenge.qop_auth {
        alg.hash(&format!(
            "{ha1}:{}:{:08x}:{}:auth:{ha2}",
            challenge.nonce, request.nc, request.cnonce
        ))
    } else {
        alg.hash(&format!("{ha1}:{}:{ha2}", challenge.nonce))
    }
}

/// The `Authorization` (or `Proxy-Authorization`) header value answering `challenge`.
pub fn authorization(challenge: &Challenge, request: &Request<'_>) -> String {
    let mut value = format!(
        "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{}\", algorithm={}",
        quote(request.username),
        quote(&challenge.realm),
        quote(&challenge.nonce),
        quote(request.uri),
        response(challenge, request),
        challenge.algorithm.name(),
    );
    if challenge.qop_auth {
        value += &format!(
            ", qop=auth, nc={:08x}, cnonce=\"{}\"",
            request.nc,
            quote(request.cnonce)
        );
    }
    if let Some(opaque) = &challenge.opaque {
        value += &format!(", opaque=\"{}\"", quote(opaque));
    }
    value
}

/// Escapes a quoted-string's `"` and `\`; a registrar's nonce is untrusted text going back into
/// a header.
fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len());
    for c in text.chars().filter(|c| *c != '\r' && *c != '\n') {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes.len());
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(cnonce: &str) -> Request<'_> {
        Request {
            method: "GET",
            uri: "/dir/index.html",
            username: "Mufasa",
            password: "Circle of Life",
            cnonce,
            nc: 1,
        }
    }

    #[test]
    fn rfc_2617_md5_with_qop_auth() {
        let challenge = parse_challenge(
            "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", \
             opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .expect("the RFC's challenge parses");
        assert_eq!(challenge.algorithm, Algorithm::Md5);
        assert!(challenge.qop_auth);
        // RFC 2617 section 3.5 ("Circle Of Life", capital O, there).
        let request = Request {
            password: "Circle Of Life",
            ..get("0a4f113b")
        };
        assert_eq!(
            response(&challenge, &request),
            "6629fae49393a05397450978507c4ef1"
        );
        let header = authorization(&challenge, &request);
        assert!(
            header.contains("qop=auth, nc=00000001, cnonce=\"0a4f113b\""),
            "{header}"
        );
        assert!(
            header.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""),
            "{header}"
        );
    }

    const RFC_7616_NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    const RFC_7616_CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";

    fn rfc_7616_challenge(algorithm: &str) -> Challenge {
        parse_challenge(&format!(
            "Digest realm=\"http-auth@example.org\", qop=\"auth, auth-int\", \
             algorithm={algorithm}, nonce=\"{RFC_7616_NONCE}\", \
             opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\""
        ))
        .expect("the RFC's challenge parses")
    }

    #[test]
    fn rfc_7616_sha256_and_md5() {
        let sha = rfc_7616_challenge("SHA-256");
        assert_eq!(sha.algorithm, Algorithm::Sha256);
        assert_eq!(
            response(&sha, &get(RFC_7616_CNONCE)),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
        let md5 = rfc_7616_challenge("MD5");
        assert_eq!(
            response(&md5, &get(RFC_7616_CNONCE)),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
    }

    #[test]
    fn challenges_we_cannot_answer_are_refused() {
        assert!(parse_challenge("Basic realm=\"x\"").is_none());
        assert!(parse_challenge("Digest nonce=\"n\"").is_none(), "no realm");
        assert!(parse_challenge("Digest realm=\"r\", nonce=\"n\", algorithm=MD5-sess").is_none());
        assert!(parse_challenge("Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\"").is_none());
        assert!(parse_challenge("").is_none());
        assert!(parse_challenge("Digest realm=\"unterminated").is_none());
        let plain =
            parse_challenge("Digest realm=\"r\", nonce=\"n\", stale=TRUE").expect("RFC 2069 style");
        assert!(!plain.qop_auth && plain.stale);
        let header = authorization(&plain, &get("c"));
        assert!(!header.contains("qop"), "{header}");
    }

    #[test]
    fn quoted_values_cannot_break_out_of_the_header() {
        let evil = parse_challenge("Digest realm=\"a\\\"b\", nonce=\"n\"").expect("parses");
        assert_eq!(evil.realm, "a\"b");
        let header = authorization(&evil, &get("c"));
        assert!(header.contains("realm=\"a\\\"b\""), "{header}");
    }
}
