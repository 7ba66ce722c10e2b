use super::*;

/// Parses with `syntax` and renders with key field `service` and fallback service `fb`.
fn render(input: &[u8], syntax: Syntax) -> Result<String, Failure> {
    let m = parse(input, syntax)?;
    let mut out = Vec::new();
    let service = m.app.unwrap_or("fb");
    write_json(&m, "service", service.as_bytes(), &mut out);
    let text = String::from_utf8(out).expect("records are UTF-8");
    let v: serde_json::Value = serde_json::from_str(&text).expect("records are valid JSON");
    assert!(v.is_object());
    Ok(text)
}

/// Real-world messages (RFC examples, logger, rsyslog, systemd, sshd, postfix, Cisco) and the
/// exact record each becomes, with `Syntax::Auto`.
const CASES: &[(&str, &str)] = &[
    // RFC 5424 section 6.5, example 1 (with its BOM).
    (
        "<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \u{feff}'su root' failed for lonvick on /dev/pts/8",
        r#"{"service":"su","facility":"auth","severity":"crit","timestamp":"2003-10-11T22:14:15.003Z","host":"mymachine.example.com","app":"su","msgid":"ID47","message":"'su root' failed for lonvick on /dev/pts/8"}"#,
    ),
    // Example 2: microseconds and a negative offset.
    (
        "<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts.",
        r#"{"service":"myproc","facility":"local4","severity":"notice","timestamp":"2003-08-24T05:14:15.000003-07:00","host":"192.0.2.1","app":"myproc","procid":"8710","message":"%% It's time to make the do-nuts."}"#,
    ),
    // Example 3: structured data and a message.
    (
        "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"] \u{feff}An application event log entry...",
        r#"{"service":"evntslog","facility":"local4","severity":"notice","timestamp":"2003-10-11T22:14:15.003Z","host":"mymachine.example.com","app":"evntslog","msgid":"ID47","structured_data":{"exampleSDID@32473":{"iut":"3","eventSource":"Application","eventID":"1011"}},"message":"An application event log entry..."}"#,
    ),
    // Example 4: two SD elements, no message.
    (
        "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"][examplePriority@32473 class=\"high\"]",
        r#"{"service":"evntslog","facility":"local4","severity":"notice","timestamp":"2003-10-11T22:14:15.003Z","host":"mymachine.example.com","app":"evntslog","msgid":"ID47","structured_data":{"exampleSDID@32473":{"iut":"3","eventSource":"Application","eventID":"1011"},"examplePriority@32473":{"class":"high"}}}"#,
    ),
    // Escapes in PARAM-VALUE: \" \\ \] unescaped; any other backslash kept.
    (
        r#"<14>1 2024-01-15T10:00:00Z h app - - [x@1 q="a \"quoted\" \\ back \] br \n"] msg"#,
        r#"{"service":"app","facility":"user","severity":"info","timestamp":"2024-01-15T10:00:00Z","host":"h","app":"app","structured_data":{"x@1":{"q":"a \"quoted\" \\ back ] br \\n"}},"message":"msg"}"#,
    ),
    // Every header field NILVALUE.
    ("<0>1 - - - - - -", r#"{"service":"fb","facility":"kern","severity":"emerg"}"#),
    // util-linux logger --rfc5424 (its own timeQuality element), as captured from a socket.
    (
        "<13>1 2026-11-21T07:41:41.445538+00:00 vm app5 - ID1 [timeQuality tzKnown=\"1\" isSynced=\"0\"][x@1 a=\"b\"] m5",
        r#"{"service":"app5","facility":"user","severity":"notice","timestamp":"2026-11-21T07:41:41.445538+00:00","host":"vm","app":"app5","msgid":"ID1","structured_data":{"timeQuality":{"tzKnown":"1","isSynced":"0"},"x@1":{"a":"b"}},"message":"m5"}"#,
    ),
    // rsyslog RSYSLOG_SyslogProtocol23Format from systemd, with a trailing newline.
    (
        "<30>1 2024-01-15T10:00:00.123456+01:00 web1 systemd 1 - - Started Session 5 of user root.\n",
        r#"{"service":"systemd","facility":"daemon","severity":"info","timestamp":"2024-01-15T10:00:00.123456+01:00","host":"web1","app":"systemd","procid":"1","message":"Started Session 5 of user root."}"#,
    ),
    // RFC 3164 section 5.4, example 1.
    (
        "<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
        r#"{"service":"su","facility":"auth","severity":"crit","timestamp":"Oct 11 22:14:15","host":"mymachine","app":"su","message":"'su root' failed for lonvick on /dev/pts/8"}"#,
    ),
    // RFC 3164 example 2: a host and no TAG.
    (
        "<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!",
        r#"{"service":"fb","facility":"user","severity":"notice","timestamp":"Feb  5 17:32:18","host":"10.0.0.99","message":"Use the BFG!"}"#,
    ),
    // logger to /dev/log: no HOSTNAME; with -i, a pid.
    (
        "<13>Nov 21 07:41:41 myapp: hello world",
        r#"{"service":"myapp","facility":"user","severity":"notice","timestamp":"Nov 21 07:41:41","app":"myapp","message":"hello world"}"#,
    ),
    (
        "<13>Nov 21 07:41:41 pidtag[367]: with pid",
        r#"{"service":"pidtag","facility":"user","severity":"notice","timestamp":"Nov 21 07:41:41","app":"pidtag","procid":"367","message":"with pid"}"#,
    ),
    // sshd through rsyslog's traditional forward format.
    (
        "<38>Jan 15 10:00:00 host1 sshd[1234]: Accepted publickey for deploy from 10.0.0.1 port 51234 ssh2",
        r#"{"service":"sshd","facility":"auth","severity":"info","timestamp":"Jan 15 10:00:00","host":"host1","app":"sshd","procid":"1234","message":"Accepted publickey for deploy from 10.0.0.1 port 51234 ssh2"}"#,
    ),
    // postfix: a slash in the TAG, brackets in the content.
    (
        "<22>Jan  5 03:04:05 mail postfix/smtpd[4242]: connect from unknown[10.0.0.2]",
        r#"{"service":"postfix/smtpd","facility":"mail","severity":"info","timestamp":"Jan  5 03:04:05","host":"mail","app":"postfix/smtpd","procid":"4242","message":"connect from unknown[10.0.0.2]"}"#,
    ),
    // rsyslog RSYSLOG_ForwardFormat: an RFC 3339 timestamp in a BSD message.
    (
        "<86>2024-01-15T10:00:00.123456+00:00 web1 sudo: pam_unix(sudo:session): session opened",
        r#"{"service":"sudo","facility":"authpriv","severity":"info","timestamp":"2024-01-15T10:00:00.123456+00:00","host":"web1","app":"sudo","message":"pam_unix(sudo:session): session opened"}"#,
    ),
    // Cisco IOS, with a host; and with milliseconds, a colon after the time and no host.
    (
        "<189>Jan 15 10:00:00 router1 %LINK-3-UPDOWN: Interface GigabitEthernet0/1, changed state to down",
        r#"{"service":"%LINK-3-UPDOWN","facility":"local7","severity":"notice","timestamp":"Jan 15 10:00:00","host":"router1","app":"%LINK-3-UPDOWN","message":"Interface GigabitEthernet0/1, changed state to down"}"#,
    ),
    (
        "<187>Mar  1 18:46:11.123: %SYS-5-CONFIG_I: Configured from console by vty0",
        r#"{"service":"%SYS-5-CONFIG_I","facility":"local7","severity":"err","timestamp":"Mar  1 18:46:11.123","app":"%SYS-5-CONFIG_I","message":"Configured from console by vty0"}"#,
    ),
    // Control characters and quotes in the content are escaped.
    (
        "<15>Jan 01 00:00:00 h t: a\t\"b\"\\c\u{1}",
        r#"{"service":"t","facility":"user","severity":"debug","timestamp":"Jan 01 00:00:00","host":"h","app":"t","message":"a\t\"b\"\\c\u0001"}"#,
    ),
];

#[test]
fn real_world_messages_become_exact_records() {
    for (input, want) in CASES {
        assert_eq!(render(input.as_bytes(), Syntax::Auto).as_deref(), Ok(*want), "{input:?}");
    }
}

#[test]
fn forced_syntax_is_followed() {
    let bsd = b"<34>Oct 11 22:14:15 mymachine su: x";
    assert_eq!(parse(bsd, Syntax::Rfc5424), Err(Failure::BadHeader));
    assert!(parse(bsd, Syntax::Rfc3164).is_ok());
    // A 5424 message read as 3164: "1" is not a timestamp.
    assert_eq!(parse(b"<34>1 - - - - - -", Syntax::Rfc3164), Err(Failure::BadTimestamp));
    // A version with a leading zero is no version: Auto reads 3164, forced 5424 refuses it.
    assert_eq!(parse(b"<13>01 - h a - - -", Syntax::Auto), Err(Failure::BadTimestamp));
    assert_eq!(parse(b"<13>01 - h a - - -", Syntax::Rfc5424), Err(Failure::BadHeader));
}

#[test]
fn failures_are_classified() {
    let cases: &[(&[u8], Failure)] = &[
        (b"hello", Failure::NoPri),
        (b"", Failure::NoPri),
        (b"<192>1 - - - - - -", Failure::BadPri),
        (b"<13", Failure::BadPri),
        (b"<>1 - - - - - -", Failure::BadPri),
        (b"<1a>x", Failure::BadPri),
        (b"<13>\xff\xfe", Failure::Utf8),
        (b"<13>1 2003-13-11T22:14:15Z h a - - -", Failure::BadTimestamp),
        (b"<13>1 2003-10-11T22:14:15 h a - - -", Failure::BadTimestamp),
        (b"<13>1 2003-10-11T22:14:15.Z h a - - -", Failure::BadTimestamp),
        (b"<13>1 - h a - - [bad", Failure::BadStructuredData),
        (b"<13>1 - h a - - [id k=v]", Failure::BadStructuredData),
        (b"<13>1 - h a - - [id k=\"v]", Failure::BadStructuredData),
        (b"<13>1 - h a - - []", Failure::BadStructuredData),
        (b"<13>1 - h a - - x", Failure::BadStructuredData),
        (b"<13>1 - h a - - [id]x", Failure::BadStructuredData),
        (b"<13>1 - h a - -", Failure::BadHeader),
        (b"<13>Foo 11 22:14:15 x", Failure::BadTimestamp),
        (b"<13>Oct 11 25:14:15 x", Failure::BadTimestamp),
        // RFC 3164 section 5.4 example 4: a year and a zone before the host.
        (
            b"<0>1990 Oct 22 10:52:01 TZ-6 scapegoat.dmz.example.org sched[0]: x",
            Failure::BadTimestamp,
        ),
    ];
    for (input, want) in cases {
        assert_eq!(parse(input, Syntax::Auto), Err(*want), "{:?}", String::from_utf8_lossy(input));
    }
    let long_app = format!("<13>1 - h {} - - -", "a".repeat(49));
    assert_eq!(parse(long_app.as_bytes(), Syntax::Auto), Err(Failure::BadHeader));
}

#[test]
fn labels_are_distinct() {
    let mut labels: Vec<_> = Failure::ALL.iter().map(|f| f.label()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), Failure::ALL.len());
    for (i, f) in Failure::ALL.iter().enumerate() {
        assert_eq!(*f as usize, i, "ALL is in discriminant order");
    }
}
