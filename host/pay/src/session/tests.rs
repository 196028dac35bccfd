use super::*;

const PAYER: &str = "0x00000000000000000000000000000000000000A1";

fn funded(sessions: &Sessions, amount: u128) -> (String, String) {
    let ticket = sessions.begin_credit(PAYER, "voucher-1", amount).unwrap();
    sessions.complete_credit("voucher-1", "0xsettle1").unwrap();
    (ticket.session_id, ticket.secret.expect("a new session hands out its secret"))
}

fn admit(sessions: &Sessions, session_id: &str, request_id: &str, price: u128, secs: u64) -> Result<Admission, SessionError> {
    sessions.admit(&AdmitRequest {
        session_id: session_id.into(),
        request_id: request_id.into(),
        pool: "pool-a".into(),
        price_per_s: price,
        max_seconds: secs,
    })
}

fn count(sessions: &Sessions, table: &str) -> i64 {
    sessions.store().conn().query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap()
}

#[test]
fn a_settled_voucher_opens_a_paid_session_and_counts_once() {
    let sessions = Sessions::in_memory().unwrap();
    let ticket = sessions.begin_credit(PAYER, "voucher-1", 1_000).unwrap();
    assert_eq!(sessions.view(&ticket.session_id).unwrap().state, SessionState::Quoted);
    // Quoted admits nothing: the voucher has not settled.
    assert!(matches!(
        admit(&sessions, &ticket.session_id, "r0", 1, 1),
        Err(SessionError::NotAdmitting { state: SessionState::Quoted, .. })
    ));
    // The same voucher begun again is the same ticket, without the secret.
    let again = sessions.begin_credit(PAYER, "voucher-1", 1_000).unwrap();
    assert_eq!((again.session_id.as_str(), again.secret), (ticket.session_id.as_str(), None));

    let first = sessions.complete_credit("voucher-1", "0xabc").unwrap();
    assert!(first.newly_credited);
    let second = sessions.complete_credit("voucher-1", "0xabc").unwrap();
    assert!(!second.newly_credited);
    let view = sessions.view(&ticket.session_id).unwrap();
    assert_eq!((view.state, view.balance, view.available), (SessionState::Paid, 1_000, 1_000));
    assert_eq!(view.payer, PAYER.to_ascii_lowercase());

    // A second voucher of the same payer credits the same live session.
    let more = sessions.begin_credit(&PAYER.to_ascii_lowercase(), "voucher-2", 500).unwrap();
    assert_eq!((more.session_id.as_str(), more.secret), (ticket.session_id.as_str(), None));
    sessions.complete_credit("voucher-2", "0xdef").unwrap();
    assert_eq!(sessions.view(&ticket.session_id).unwrap().balance, 1_500);
}

#[test]
fn a_voucher_key_reused_with_other_terms_is_refused() {
    let sessions = Sessions::in_memory().unwrap();
    sessions.begin_credit(PAYER, "v", 10).unwrap();
    assert!(matches!(sessions.begin_credit(PAYER, "v", 11), Err(SessionError::VoucherConflict { .. })));
    let other = "0x00000000000000000000000000000000000000b2";
    assert!(matches!(sessions.begin_credit(other, "v", 10), Err(SessionError::VoucherConflict { .. })));
    assert!(matches!(sessions.begin_credit("0x12", "w", 10), Err(SessionError::InvalidPayer(_))));
    assert!(matches!(sessions.begin_credit(PAYER, "w", 0), Err(SessionError::InvalidAmount(_))));
    assert!(matches!(sessions.complete_credit("nope", "0x"), Err(SessionError::UnknownVoucher(_))));
}

#[test]
fn a_failed_settlement_closes_the_quoted_session_and_pending_vouchers_are_bounded() {
    let sessions = Sessions::in_memory().unwrap();
    let ticket = sessions.begin_credit(PAYER, "v0", 10).unwrap();
    sessions.fail_credit("v0", "insufficient_funds").unwrap();
    sessions.fail_credit("v0", "insufficient_funds").unwrap();
    let view = sessions.view(&ticket.session_id).unwrap();
    assert_eq!(view.state, SessionState::Closed);
    assert_eq!(view.note.as_deref(), Some("settlement failed: insufficient_funds"));
    // A closed session takes no credit; the next voucher opens a new session.
    let next = sessions.begin_credit(PAYER, "v1", 10).unwrap();
    assert_ne!(next.session_id, ticket.session_id);
    assert!(next.secret.is_some());

    for i in 2..=MAX_PENDING_CREDITS {
        sessions.begin_credit(PAYER, &format!("v{i}"), 10).unwrap();
    }
    assert_eq!(sessions.pending_credits().unwrap().len(), MAX_PENDING_CREDITS as usize);
    assert!(matches!(sessions.begin_credit(PAYER, "one-too-many", 10), Err(SessionError::TooManyPending { .. })));
}

#[test]
fn admission_reserves_the_worst_case_and_refusals_write_nothing() {
    let sessions = Sessions::in_memory().unwrap();
    let (session_id, _) = funded(&sessions, 1_000);
    let granted = admit(&sessions, &session_id, "r1", 30, 20).unwrap();
    assert_eq!((granted.reserved, granted.available), (600, 400));
    // The same request again is the same admission, not a second reservation.
    assert_eq!(admit(&sessions, &session_id, "r1", 30, 20).unwrap().reserved, 600);
    assert_eq!(sessions.view(&session_id).unwrap().reserved, 600);
    assert!(matches!(admit(&sessions, &session_id, "r1", 30, 21), Err(SessionError::DuplicateRequest(_))));

    // A flood of requests the balance cannot cover: each refused with what it needs, no row written.
    let before = (count(&sessions, "requests"), count(&sessions, "transitions"), count(&sessions, "credits"));
    for i in 0..1_000 {
        match admit(&sessions, &session_id, &format!("flood{i}"), 30, 14) {
            Err(SessionError::Insufficient { needed: 420, available: 400, shortfall: 20, .. }) => {}
            other => panic!("expected insufficient, got {other:?}"),
        }
    }
    assert_eq!(before, (count(&sessions, "requests"), count(&sessions, "transitions"), count(&sessions, "credits")));
    assert_eq!(sessions.view(&session_id).unwrap().reserved, 600);
}

#[test]
fn concurrent_admissions_cannot_overdraw() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = Sessions::open(&dir.path().join("payments.db")).unwrap();
    let (session_id, _) = funded(&sessions, 1_000);
    // Two handles on the same file (as two processes would be) and threads on each.
    let other = Sessions::open(&dir.path().join("payments.db")).unwrap();
    let granted: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let sessions = if i % 2 == 0 { sessions.clone() } else { other.clone() };
                let session_id = session_id.clone();
                scope.spawn(move || admit(&sessions, &session_id, &format!("r{i}"), 7, 10).is_ok())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // 1000 / 70 = 14 fit.
    assert_eq!(granted.iter().filter(|ok| **ok).count(), 14);
    let view = sessions.view(&session_id).unwrap();
    assert_eq!((view.reserved, view.available), (980, 20));
}

#[test]
fn the_secret_authenticates_its_session_only() {
    let sessions = Sessions::in_memory().unwrap();
    let (session_id, secret) = funded(&sessions, 10);
    assert_eq!(secret.len(), 64);
    sessions.authenticate(&session_id, &secret).unwrap();
    assert!(matches!(sessions.authenticate(&session_id, "guess"), Err(SessionError::Unauthorized)));
    assert!(matches!(sessions.authenticate("ps_other", &secret), Err(SessionError::Unauthorized)));
    // Only the hash is stored.
    let stored: String = sessions
        .store()
        .conn()
        .query_row("SELECT secret_sha256 FROM sessions WHERE id = ?1", [&session_id], |r| r.get(0))
        .unwrap();
    assert_ne!(stored, secret);
}

#[test]
fn illegal_transitions_are_typed_errors() {
    let sessions = Sessions::in_memory().unwrap();
    let (session_id, _) = funded(&sessions, 100);
    admit(&sessions, &session_id, "r1", 1, 10).unwrap();
    // A session with an admitted request cannot close.
    assert!(matches!(
        sessions.close(&session_id, "bye"),
        Err(SessionError::IllegalTransition { from: SessionState::Paid, to: SessionState::Closed, .. })
    ));
    let store = sessions.store();
    // paid → idle skips streaming.
    let err = store.write(|tx| write_transition(tx, &session_id, SessionState::Idle, "k1", None)).unwrap_err();
    assert!(matches!(err, SessionError::IllegalTransition { from: SessionState::Paid, to: SessionState::Idle, .. }));
    // The same key twice moves once.
    store.write(|tx| write_transition(tx, &session_id, SessionState::Streaming, "k2", None)).unwrap();
    store.write(|tx| write_transition(tx, &session_id, SessionState::Streaming, "k2", None)).unwrap();
    assert_eq!(sessions.view(&session_id).unwrap().state, SessionState::Streaming);
    let err = sessions.close(&session_id, "bye").unwrap_err();
    assert!(matches!(err, SessionError::IllegalTransition { from: SessionState::Streaming, .. }));
}

#[test]
fn the_view_serialises_amounts_as_decimal_strings() {
    let sessions = Sessions::in_memory().unwrap();
    let ticket = sessions.begin_credit(PAYER, "big", u128::MAX).unwrap();
    sessions.complete_credit("big", "0x1").unwrap();
    let json = serde_json::to_value(sessions.view(&ticket.session_id).unwrap()).unwrap();
    assert_eq!(json["balance"], serde_json::json!(u128::MAX.to_string()));
    assert_eq!(json["state"], "paid");
    assert_eq!(json["stream"]["state"], "stopped");
    // Another credit would overflow: refused, balance unchanged.
    sessions.begin_credit(PAYER, "more", 1).unwrap();
    assert!(matches!(sessions.complete_credit("more", "0x2"), Err(SessionError::Overflow)));
    assert_eq!(sessions.view(&ticket.session_id).unwrap().balance, u128::MAX);
}

#[test]
fn a_voucher_that_settles_after_its_session_closed_is_credited_to_a_new_one() {
    let sessions = Sessions::in_memory().unwrap();
    let (session_id, _) = funded(&sessions, 100);
    sessions.begin_credit(PAYER, "late", 40).unwrap();
    sessions.close(&session_id, "payer left").unwrap();
    let outcome = sessions.complete_credit("late", "0xlate").unwrap();
    assert_ne!(outcome.session_id, session_id);
    let secret = outcome.secret.expect("a session opened for the late voucher hands out its secret");
    sessions.authenticate(&outcome.session_id, &secret).unwrap();
    let view = sessions.view(&outcome.session_id).unwrap();
    assert_eq!((view.state, view.balance), (SessionState::Paid, 40));
    assert_eq!(sessions.view(&session_id).unwrap().balance, 100, "the closed session keeps what it had");
    // Still once per voucher.
    assert!(!sessions.complete_credit("late", "0xlate").unwrap().newly_credited);
    assert_eq!(sessions.view(&outcome.session_id).unwrap().balance, 40);
}
