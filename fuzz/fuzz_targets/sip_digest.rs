//! Digest authentication text from the network (RFC 3261 section 22, RFC 8760): a registrar's
//! `WWW-Authenticate`/`Proxy-Authenticate` challenge, and a caller's `Authorization` checked by
//! `--sip-auth-users`.
//!
//! Round trips:
//! - a challenge that parses, answered with [`digest::authorization`], parses back as the
//!   credentials we sent, and the registrar's check of them ([`digest::expected_response`])
//!   gives the response we computed;
//! - our own challenge ([`digest::challenge_header`]) parses back as what we issued;
//! - a caller answering our challenges with the right password is let in, with a wrong one or
//!   as an unknown user is challenged again (the same answer: no account enumeration).
//!
//! Input: lines (LF) in order: a challenge value, an Authorization value, then the user name,
//! password, request URI, cnonce and method an answer is made with; missing lines are empty.
#![no_main]
use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use talkline_runtime::sip::digest::{self, Algorithm, Request};
use talkline_runtime::sip::policy::{CallerAuth, Verdict};

/// What a value becomes once quoted into a header: CR and LF cannot travel in one.
fn sent(text: &str) -> String {
    text.replace(['\r', '\n'], "")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let mut line = || lines.next().unwrap_or("").to_string();
    let (challenge, authorization) = (line(), line());
    let (username, password, uri, cnonce, method) = (line(), line(), line(), line(), line());
    let nc = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let request = Request {
        method: &method,
        uri: &uri,
        username: &username,
        password: &password,
        cnonce: &cnonce,
        nc,
    };

    if let Some(credentials) = digest::parse_authorization(&authorization) {
        let _ = digest::expected_response(&credentials, &method, &password);
    }

    if let Some(challenge) = digest::parse_challenge(&challenge) {
        let header = digest::authorization(&challenge, &request);
        assert!(!header.contains(['\r', '\n']), "{header:?}");
        let back = digest::parse_authorization(&header)
            .unwrap_or_else(|| panic!("our Authorization does not parse: {header:?}"));
        assert_eq!(back.username, sent(&username));
        assert_eq!(back.realm, sent(&challenge.realm));
        assert_eq!(back.nonce, sent(&challenge.nonce));
        assert_eq!(back.uri, sent(&uri));
        assert_eq!(back.algorithm, challenge.algorithm);
        assert_eq!(
            back.qop_auth,
            challenge.qop_auth.then(|| (nc, sent(&cnonce)))
        );
        let fields = [&username, &uri, &cnonce, &challenge.realm, &challenge.nonce];
        if !fields.iter().any(|f| f.contains(['\r', '\n'])) {
            assert_eq!(
                digest::expected_response(&back, &method, &password),
                digest::response(&challenge, &request)
            );
        }
    }

    // Our challenges, with the realm the input gives (operators configure it).
    let realm = &challenge;
    for (algorithm, stale) in [(Algorithm::Md5, false), (Algorithm::Sha256, true)] {
        let header = digest::challenge_header(realm, &cnonce, algorithm, stale);
        let back = digest::parse_challenge(&header)
            .unwrap_or_else(|| panic!("our challenge does not parse: {header:?}"));
        assert_eq!(back.realm, sent(realm));
        assert_eq!(back.nonce, sent(&cnonce));
        assert_eq!(
            (back.algorithm, back.stale, back.qop_auth),
            (algorithm, stale, true)
        );
    }

    // The caller side, as an INVITE meets it.
    if realm.contains(['\r', '\n']) || username.contains(['\r', '\n']) || uri.contains(['\r', '\n'])
    {
        return;
    }
    // Our cnonces are hex: only what a header can carry back is answered with.
    let cnonce = sent(&cnonce);
    let request = Request {
        cnonce: &cnonce,
        ..request
    };
    let epoch = Instant::now();
    let users = HashMap::from([(username.clone(), password.clone())]);
    let auth = CallerAuth::new(realm, users, [7; 32], epoch);
    let now = epoch + Duration::from_secs(1);
    let _ = auth.check(now, &method, &uri, Some(&authorization));
    let Verdict::Challenge(challenges) = auth.check(now, &method, &uri, None) else {
        panic!("no credentials and let in");
    };
    for value in &challenges {
        let challenge = digest::parse_challenge(value)
            .unwrap_or_else(|| panic!("our challenge does not parse: {value:?}"));
        let answer = |username: &str, password: &str| {
            let request = Request {
                username,
                password,
                nc: 1,
                ..request
            };
            auth.check(
                now,
                &method,
                &uri,
                Some(&digest::authorization(&challenge, &request)),
            )
        };
        assert_eq!(
            answer(&username, &password),
            Verdict::Authorized {
                user: username.clone()
            },
            "{value:?}"
        );
        let wrong = format!("{password}x");
        let other = format!("{username}x");
        for verdict in [answer(&username, &wrong), answer(&other, &password)] {
            assert!(matches!(verdict, Verdict::Challenge(_)), "{verdict:?}");
        }
    }
});
