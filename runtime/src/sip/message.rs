//! SIP messages at the edge: parsing with rsip (RFC 3261 grammar), a lenient fallback that only
//! recovers enough of a broken request to answer it (400, or 501 for a method rsip does not know),
//! and the text of the requests and responses we send.
//!
//! Everything the transaction and dialog layers need is copied into [`Message`], so they never
//! see rsip's types and never re-parse.

use rsip::headers::untyped::UntypedHeader;
use rsip::Header;

/// Largest datagram we read; SIP over UDP should stay under the path MTU anyway (RFC 3261
/// section 18.1.1), and a larger one is dropped by the socket read.
pub const MAX_DATAGRAM: usize = 65_535;

/// Methods we answer; the `Allow` header of our responses. NOTIFY only within a dialog: the
/// progress of a transfer we asked for with REFER.
pub const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, uri: String },
    Response { code: u16 },
}

/// A parsed message: the start line and the headers the UA acts on, as raw values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    /// Every Via value, in order (responses copy them all).
    pub vias: Vec<String>,
    pub from: String,
    pub to: String,
    pub call_id: String,
    pub cseq: u32,
    pub cseq_method: String,
    pub contact: Option<String>,
    /// A 401's `WWW-Authenticate` (false) or a 407's `Proxy-Authenticate` (true) value.
    pub challenge: Option<(bool, String)>,
    /// The `Expires` header, in seconds.
    pub expires: Option<u32>,
    pub body: Vec<u8>,
}

impl Message {
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn code(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// The top Via's branch: the transaction id (RFC 3261 section 17.2.3).
    pub fn branch(&self) -> Option<&str> {
        param(self.vias.first()?, "branch")
    }

    pub fn from_tag(&self) -> Option<&str> {
        param(&self.from, "tag")
    }

    pub fn to_tag(&self) -> Option<&str> {
        param(&self.to, "tag")
    }

    /// The URI inside the Contact header, where in-dialog requests go.
    pub fn contact_uri(&self) -> Option<&str> {
        self.contact.as_deref().map(name_addr_uri)
    }
}

/// Why a datagram was not a usable message.
#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Enough of a request survived to answer it with this status code.
    Answer { code: u16, partial: Box<Message> },
    /// Not even a request line and the headers to route an answer: dropped.
    Drop,
}

pub fn parse(datagram: &[u8]) -> Result<Message, Malformed> {
    match parse_strict(datagram) {
        Some(Ok(message)) => Ok(message),
        Some(Err(missing_headers)) => Err(salvage(datagram, 400).unwrap_or(missing_headers)),
        None => Err(salvage(datagram, 0).unwrap_or(Malformed::Drop)),
    }
}

/// rsip's parse; `None` when the grammar fails, `Some(Err)` when a mandatory header is missing.
fn parse_strict(datagram: &[u8]) -> Option<Result<Message, Malformed>> {
    // rsip is a nom parser over untrusted input. It has not been seen to panic, but one panic
    // would take down every call on the socket, so it runs behind a catch_unwind.
    let parsed = std::panic::catch_unwind(|| rsip::SipMessage::try_from(datagram)).ok()?;
    let message = parsed.ok()?;
    let (start, headers, body) = match message {
        rsip::SipMessage::Request(r) => (
            StartLine::Request {
                method: r.method.to_string(),
                uri: r.uri.to_string(),
            },
            r.headers,
            r.body,
        ),
        rsip::SipMessage::Response(r) => (
            StartLine::Response {
                code: r.status_code.code(),
            },
            r.headers,
            r.body,
        ),
    };
    let mut fields = Fields::default();
    for header in headers.iter() {
        match header {
            Header::Via(v) => fields.vias.push(v.value().to_string()),
            Header::From(v) => fields.from = Some(v.value().to_string()),
            Header::To(v) => fields.to = Some(v.value().to_string()),
            Header::CallId(v) => fields.call_id = Some(v.value().to_string()),
            Header::CSeq(v) => fields.cseq = Some(v.value().to_string()),
            Header::Contact(v) => fields.contact = Some(v.value().to_string()),
            // The first Digest challenge is the one answered; registrars list their preferred
            // algorithm first (RFC 8760 section 2.4).
            Header::WwwAuthenticate(v) if fields.challenge.is_none() => {
                fields.challenge = Some((false, v.value().to_string()))
            }
            Header::ProxyAuthenticate(v) if fields.challenge.is_none() => {
                fields.challenge = Some((true, v.value().to_string()))
            }
            Header::Expires(v) => fields.expires = v.value().trim().parse().ok(),
            _ => {}
        }
    }
    Some(fields.into_message(start, body).ok_or(Malformed::Drop))
}

#[derive(Default)]
struct Fields {
    vias: Vec<String>,
    from: Option<String>,
    to: Option<String>,
    call_id: Option<String>,
    cseq: Option<String>,
    contact: Option<String>,
    challenge: Option<(bool, String)>,
    expires: Option<u32>,
}

impl Fields {
    fn into_message(self, start: StartLine, body: Vec<u8>) -> Option<Message> {
        let cseq = self.cseq?;
        let (number, method) = cseq.trim().split_once(char::is_whitespace)?;
        let message = Message {
            start,
            from: self.from?,
            to: self.to?,
            call_id: self.call_id?.trim().to_string(),
            cseq: number.trim().parse().ok()?,
            cseq_method: method.trim().to_ascii_uppercase(),
            contact: self.contact,
            challenge: self.challenge,
            expires: self.expires,
            body,
            vias: self.vias,
        };
        (!message.vias.is_empty() && !message.call_id.is_empty()).then_some(message)
    }

    /// What is left when mandatory headers are missing: empty strings, so an error response can
    /// still be written with whatever did arrive.
    fn into_partial(self, start: StartLine) -> Message {
        let cseq = self.cseq.unwrap_or_default();
        let mut parts = cseq.split_whitespace();
        Message {
            start,
            from: self.from.unwrap_or_default(),
            to: self.to.unwrap_or_default(),
            call_id: self.call_id.unwrap_or_default().trim().to_string(),
            cseq: parts.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            cseq_method: parts.next().unwrap_or_default().to_ascii_uppercase(),
            contact: self.contact,
            challenge: self.challenge,
            expires: self.expires,
            body: Vec::new(),
            vias: self.vias,
        }
    }
}

/// Methods rsip parses; a request line with any other method is answered 501.
const RSIP_METHODS: [&str; 14] = [
    "ACK",
    "BYE",
    "CANCEL",
    "INFO",
    "INVITE",
    "MESSAGE",
    "NOTIFY",
    "OPTIONS",
    "PRACK",
    "PUBLISH",
    "REFER",
    "REGISTER",
    "SUBSCRIBE",
    "UPDATE",
];

/// Reads a broken request line by line, to answer it. `code` 0: 501 for an unknown method, else
/// 400. Responses and anything without a Via to answer along are dropped.
fn salvage(datagram: &[u8], code: u16) -> Option<Malformed> {
    let text = String::from_utf8_lossy(datagram);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = unfold(head).into_iter();
    let request_line = lines.next()?;
    let mut tokens = request_line.split_whitespace();
    let (method, uri, version) = (tokens.next()?, tokens.next()?, tokens.next()?);
    if version != "SIP/2.0" || !method.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let mut fields = Fields::default();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match name.trim().to_ascii_lowercase().as_str() {
            "via" | "v" => fields.vias.push(value),
            "from" | "f" => fields.from = Some(value),
            "to" | "t" => fields.to = Some(value),
            "call-id" | "i" => fields.call_id = Some(value),
            "cseq" => fields.cseq = Some(value),
            "contact" | "m" => fields.contact = Some(value),
            _ => {}
        }
    }
    if fields.vias.is_empty() || method.eq_ignore_ascii_case("ACK") {
        // Nothing to route an answer along, and an ACK is never answered.
        return None;
    }
    let method = method.to_ascii_uppercase();
    let known = RSIP_METHODS.contains(&method.as_str());
    let code = if code == 0 && !known { 501 } else { 400 };
    let start = StartLine::Request {
        method,
        uri: uri.to_string(),
    };
    Some(Malformed::Answer {
        code,
        partial: Box::new(fields.into_partial(start)),
    })
}

/// Header lines with continuation lines (leading whitespace) joined to the line before.
fn unfold(head: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for line in head.lines() {
        match lines.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => lines.push(line.trim_end().to_string()),
        }
    }
    lines
}

/// A header parameter (`;name=value`) outside the angle-bracketed URI.
pub fn param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = value.rfind('>').map_or(value, |end| &value[end..]);
    params.split(';').skip(1).find_map(|p| {
        let (key, val) = p.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| val.trim().trim_end_matches(',').trim())
    })
}

/// The URI of a name-addr (`"Name" <sip:a@b>;tag=x`) or an addr-spec (`sip:a@b;tag=x`).
pub fn name_addr_uri(value: &str) -> &str {
    if let (Some(open), Some(close)) = (value.find('<'), value.find('>')) {
        if open < close {
            return &value[open + 1..close];
        }
    }
    value.split(';').next().unwrap_or(value).trim()
}

pub fn reason(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        200 => "OK",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        481 => "Call/Transaction Does Not Exist",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A response to `request`. `to_tag` is added to To unless the request's To already has one.
pub fn response(
    request: &Message,
    code: u16,
    to_tag: Option<&str>,
    extra_headers: &[(&str, String)],
    body: Option<&str>,
) -> Vec<u8> {
    let mut text = format!("SIP/2.0 {code} {}\r\n", reason(code));
    for via in &request.vias {
        text += &format!("Via: {via}\r\n");
    }
    text += &format!("From: {}\r\n", request.from);
    match to_tag {
        Some(tag) if request.to_tag().is_none() && !request.to.is_empty() => {
            text += &format!("To: {};tag={tag}\r\n", request.to)
        }
        _ => text += &format!("To: {}\r\n", request.to),
    }
    text += &format!("Call-ID: {}\r\n", request.call_id);
    text += &format!("CSeq: {} {}\r\n", request.cseq, request.cseq_method);
    for (name, value) in extra_headers {
        text += &format!("{name}: {value}\r\n");
    }
    finish(text, body)
}

/// A request we originate.
pub struct OutgoingRequest<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    /// `SIP/2.0/UDP host:port;branch=...;rport`
    pub via: String,
    pub from: &'a str,
    pub to: &'a str,
    pub call_id: &'a str,
    pub cseq: u32,
    pub contact: Option<&'a str>,
    pub body: Option<&'a str>,
}

impl OutgoingRequest<'_> {
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with(&[])
    }

    /// The request with headers only some methods carry (REFER's `Refer-To`).
    pub fn to_bytes_with(&self, extra_headers: &[(&str, String)]) -> Vec<u8> {
        let mut text = format!("{} {} SIP/2.0\r\n", self.method, self.uri);
        text += &format!("Via: {}\r\n", self.via);
        text += "Max-Forwards: 70\r\n";
        text += &format!("From: {}\r\n", self.from);
        text += &format!("To: {}\r\n", self.to);
        text += &format!("Call-ID: {}\r\n", self.call_id);
        // ACK and CANCEL keep the number of the INVITE they belong to; the caller sets it.
        text += &format!("CSeq: {} {}\r\n", self.cseq, self.method);
        if let Some(contact) = self.contact {
            text += &format!("Contact: <{contact}>\r\n");
        }
        for (name, value) in extra_headers {
            text += &format!("{name}: {value}\r\n");
        }
        text += "User-Agent: talkline\r\n";
        finish(text, self.body)
    }
}

fn finish(mut text: String, body: Option<&str>) -> Vec<u8> {
    match body {
        Some(body) => {
            text += "Content-Type: application/sdp\r\n";
            text += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
        }
        None => text += "Content-Length: 0\r\n\r\n",
    }
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:agent@127.0.0.1:5060 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1;rport\r\n\
        Max-Forwards: 70\r\n\
        From: \"Patient\" <sip:patient@127.0.0.1:5070>;tag=abc\r\n\
        To: <sip:agent@127.0.0.1:5060>\r\n\
        Call-ID: call-1@127.0.0.1\r\n\
        CSeq: 1 INVITE\r\n\
        Contact: <sip:patient@127.0.0.1:5070>\r\n\
        Content-Type: application/sdp\r\n\
        Content-Length: 4\r\n\r\nv=0\n";

    #[test]
    fn an_invite_parses_into_the_fields_the_ua_needs() {
        let m = parse(INVITE.as_bytes()).expect("a valid INVITE");
        assert_eq!(m.method(), Some("INVITE"));
        assert_eq!(m.branch(), Some("z9hG4bK-1"));
        assert_eq!(m.from_tag(), Some("abc"));
        assert_eq!(m.to_tag(), None);
        assert_eq!((m.cseq, m.cseq_method.as_str()), (1, "INVITE"));
        assert_eq!(m.contact_uri(), Some("sip:patient@127.0.0.1:5070"));
        assert_eq!(m.body, b"v=0\n");
    }

    #[test]
    fn a_response_copies_the_transaction_headers_and_adds_the_to_tag() {
        let m = parse(INVITE.as_bytes()).expect("a valid INVITE");
        let text =
            String::from_utf8(response(&m, 200, Some("xyz"), &[], Some("v=0\r\n"))).expect("ASCII");
        assert!(text.starts_with("SIP/2.0 200 OK\r\n"));
        assert!(text.contains("Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1;rport\r\n"));
        assert!(text.contains("To: <sip:agent@127.0.0.1:5060>;tag=xyz\r\n"));
        assert!(text.contains("Content-Length: 5\r\n\r\nv=0\r\n"));
        let back = parse(text.as_bytes()).expect("our response parses");
        assert_eq!((back.code(), back.to_tag()), (Some(200), Some("xyz")));
    }

    // Messages after RFC 4475 (SIP torture tests), cut to what a UDP UAS meets.
    #[test]
    fn rfc4475_torture_messages_parse_or_are_rejected_without_panicking() {
        // 3.1.1.1 wsinv, in spirit: compact headers and folded lines are valid SIP.
        let compact =
            "OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nv: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK-c\r\n\
            f: <sip:a@192.0.2.2>;tag=1\r\nt: <sip:agent@127.0.0.1>\r\ni: compact-1\r\n\
            CSeq: 8\r\n  OPTIONS\r\nl: 0\r\n\r\n";
        match parse(compact.as_bytes()) {
            Ok(m) => assert_eq!(m.call_id, "compact-1"),
            Err(Malformed::Answer { code, .. }) => assert_eq!(code, 400),
            Err(Malformed::Drop) => panic!("a routable request must be answered"),
        }
        // 3.1.2.4 ncl: a negative Content-Length.
        let negative = INVITE.replace("Content-Length: 4", "Content-Length: -999");
        let _ = parse(negative.as_bytes());
        // 3.1.2.7 unkscm / 3.1.2.10 escruri and friends: garbage bytes in every position.
        for garbage in [
            &b""[..],
            b"\r\n\r\n",
            b"\x00\xff\xfe garbage",
            b"INVITE",
            b"SIP/2.0 200",
            b"INVITE sip:a@b SIP/2.0\r\n\r\n",
            b"INVITE sip:a@b SIP/7.0\r\nVia: SIP/7.0/UDP x\r\n\r\n",
        ] {
            let _ = parse(garbage);
        }
        // 3.3.1 insuf: a request without Call-ID, From, To, CSeq gets 400.
        let insufficient =
            "INVITE sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK-i\r\n\
            Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            parse(insufficient.as_bytes()),
            Err(Malformed::Answer { code: 400, .. })
        ));
        // 3.3.2 unkreq: an unknown method gets 501.
        let unknown = INVITE
            .replace("INVITE sip:", "NEWMETHOD sip:")
            .replace("1 INVITE", "1 NEWMETHOD");
        match parse(unknown.as_bytes()) {
            Err(Malformed::Answer { code, partial }) => {
                assert_eq!(code, 501);
                assert_eq!(partial.call_id, "call-1@127.0.0.1");
            }
            other => panic!("expected a 501, got {other:?}"),
        }
        // 3.1.2.3 scalar02 in spirit: a CSeq that is not a number.
        let bad_cseq = INVITE.replace("CSeq: 1 INVITE", "CSeq: 99999999999999999999 INVITE");
        assert!(parse(bad_cseq.as_bytes()).is_err());
    }

    #[test]
    fn params_and_uris_come_out_of_name_addrs() {
        assert_eq!(param("<sip:a@b;tag=no>;tag=yes", "tag"), Some("yes"));
        assert_eq!(param("sip:a@b;TAG=x", "tag"), Some("x"));
        assert_eq!(param("<sip:a@b>", "tag"), None);
        assert_eq!(name_addr_uri("\"A\" <sip:a@b:5>;tag=1"), "sip:a@b:5");
        assert_eq!(name_addr_uri("sip:a@b;tag=1"), "sip:a@b");
    }
}
