//! The local backend on the real SmolLM2-135M GGUF: tokenizer, KV reuse, rollback, speculative
//! decoding, cancellation, end-of-turn probability and re-quantization. One binary, so the
//! model loads once; every test keeps to a few tokens (CI runs them on 2 cores).

mod support;

use std::sync::Arc;

use talkline_llm::{
    CancelToken, ChatSession, DraftSource, GenerateParams, LoadOptions, LocalConfig, LocalModel,
    Message, Sampling, StopReason,
};

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: Sampling::Greedy,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

/// Reference ids from llama.cpp's own tokenizer (llama-cpp-python, `tokenize(text,
/// add_bos=False, special=True)`) on the same GGUF; see tests/fixtures/README.md.
#[test]
fn tokenizer_ids_equal_llama_cpp_reference() {
    let model = support::smollm2();
    let cases: Vec<Case> = serde_json::from_str(include_str!("fixtures/smollm2_token_ids.json"))
        .expect("the fixture is valid JSON");
    assert!(cases.len() >= 10);
    for case in &cases {
        let ids = model.tokenizer.encode(&case.text).expect("encodes");
        assert_eq!(ids, case.ids, "token ids of {:?}", case.text);
        let back = model.tokenizer.decode(&ids).expect("decodes");
        assert_eq!(back, case.text, "round trip of {:?}", case.text);
    }
}

#[test]
fn greedy_reply_ends_at_end_of_turn_and_answers() {
    let model = support::smollm2();
    let mut session = model.session();
    let mut streamed = String::new();
    let reply = session
        .reply(
            // Not "What is the capital of France?": on that prompt the 135M model's greedy path
            // turns on the rounding of its Q8 activations, so the answer differs between the
            // scalar, AVX2 and AVX-512 kernels. This one answers "Paris" on all three.
            &[Message::user("Name the capital city of France.")],
            &greedy(24),
            &CancelToken::new(),
            &mut |piece| streamed.push_str(piece),
        )
        .expect("generates");
    assert_eq!(reply.text, streamed);
    assert!(reply.text.contains("Paris"), "{:?}", reply.text);
    assert_eq!(reply.stop, StopReason::EndOfTurn, "{:?}", reply.text);
    assert_eq!(reply.stats.generated_tokens, reply.tokens.len());
}

#[test]
fn kv_reuse_gives_the_logits_of_a_full_prefill() {
    let model = support::smollm2();
    let mut session = model.session();
    let first = [Message::user("Name a colour.")];
    let reply = session
        .reply(&first, &greedy(6), &CancelToken::new(), &mut |_| {})
        .expect("first turn");
    let second = [
        Message::user("Name a colour."),
        Message::assistant(reply.text.clone()),
        Message::user("Another one?"),
    ];
    let prompt = model.prompt_tokens(&second).expect("renders");
    let reused = session
        .sync(&prompt, &CancelToken::new())
        .expect("syncs")
        .expect("not cancelled");
    // The whole first turn (prompt and reply) stays cached; only the new turn is processed.
    let first_prompt = model.prompt_tokens(&first).expect("renders");
    assert!(
        reused >= first_prompt.len(),
        "reused {reused} of {}",
        prompt.len()
    );
    let reused_logits = session.logits().to_vec();

    let mut fresh = model.session();
    fresh
        .sync(&prompt, &CancelToken::new())
        .expect("syncs")
        .expect("not cancelled");
    let diff = max_abs_diff(&reused_logits, fresh.logits());
    assert!(diff < 1e-3, "max |logit difference| {diff}");
}

#[test]
fn rollback_then_extend_equals_a_fresh_prefill() {
    let model = support::smollm2();
    let history = Message::system("You are a helpful assistant.");
    let partial = [
        history.clone(),
        Message::user("so I was thinking we could go to"),
    ];
    let revised = [
        history,
        Message::user("so I was wondering whether the museum opens on Sunday"),
    ];
    let mut session = model.session();
    session.prefill(&partial).expect("speculative prefill");
    let (partial_ids, _) = model.open_tokens(&partial).expect("renders");
    assert_eq!(session.cached_tokens(), &partial_ids[..]);

    // The transcript changed: the session rolls back to the common prefix and extends.
    session.prefill(&revised).expect("revised prefill");
    let (revised_ids, _) = model.open_tokens(&revised).expect("renders");
    assert_eq!(session.cached_tokens(), &revised_ids[..]);
    let rolled = session.logits().to_vec();

    let mut fresh = model.session();
    fresh.prefill(&revised).expect("fresh prefill");
    let diff = max_abs_diff(&rolled, fresh.logits());
    assert!(diff < 1e-3, "max |logit difference| {diff}");

    // Explicit truncate + extend, token by token, lands on the same logits too.
    let common = partial_ids
        .iter()
        .zip(&revised_ids)
        .take_while(|(a, b)| a == b)
        .count();
    session.truncate(common);
    for &t in &revised_ids[common..] {
        session.extend(&[t]).expect("extends");
    }
    let diff = max_abs_diff(session.logits(), fresh.logits());
    assert!(diff < 1e-3, "max |logit difference| {diff}");
}

#[test]
fn a_reply_to_a_prompt_synced_to_its_last_token_runs_no_prompt_token_and_answers_the_same() {
    let model = support::smollm2();
    let history = Message::system("You are a helpful assistant.");
    let asked = [history.clone(), Message::user("Name a fruit.")];
    let prompt = model.prompt_tokens(&asked).expect("renders");

    let mut fresh = model.session();
    let expected = fresh
        .reply(&asked, &greedy(8), &CancelToken::new(), &mut |_| {})
        .expect("fresh reply");

    let mut session = model.session();
    session
        .sync(&prompt, &CancelToken::new())
        .expect("syncs")
        .expect("not cancelled");
    let reply = session
        .reply(&asked, &greedy(8), &CancelToken::new(), &mut |_| {})
        .expect("reply");
    assert_eq!(
        reply.stats.reused_tokens,
        prompt.len(),
        "the whole prompt was cached"
    );
    assert_eq!(reply.text, expected.text);

    // After a reply the cached logits are those of its last step, not of the prompt: a second
    // reply to the same messages runs the prompt's last token again and answers the same.
    let again = session
        .reply(&asked, &greedy(8), &CancelToken::new(), &mut |_| {})
        .expect("second reply");
    assert_eq!(again.text, expected.text);
    assert_eq!(again.stats.reused_tokens, prompt.len() - 1);
}

#[test]
fn a_prompt_cancelled_midway_leaves_a_cache_that_later_prompts_can_trust() {
    let model = support::smollm2();
    let long = [
        Message::system("You are a helpful assistant for a clinic."),
        Message::user(
            "My doctor said my kidney function was a little low last month, and my potassium \
             was high too. Should I be worried about that, and what should I eat?",
        ),
    ];
    let prompt = model.prompt_tokens(&long).expect("renders");
    let mut session = model.session();
    let cancel = CancelToken::new();
    // Fires somewhere inside the prefill (a few layers in, or between passes, or after it: every
    // outcome must leave the cache consistent).
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(15));
            cancel.cancel();
        });
        let synced = session
            .sync(&prompt, &cancel)
            .expect("a cancelled sync is not an error");
        assert_eq!(
            synced.is_none(),
            cancel.is_cancelled() && session.cached_tokens().len() < prompt.len()
        );
    });
    let kept = session.cached_tokens().len();
    assert_eq!(session.cached_tokens(), &prompt[..kept]);

    let reused = session
        .sync(&prompt, &CancelToken::new())
        .expect("syncs")
        .expect("not cancelled");
    assert!(reused <= kept);
    let mut fresh = model.session();
    fresh
        .sync(&prompt, &CancelToken::new())
        .expect("syncs")
        .expect("not cancelled");
    let diff = max_abs_diff(session.logits(), fresh.logits());
    assert!(diff < 1e-3, "max |logit difference| {diff}");

    // Cancelled before it starts: nothing is computed and nothing is rolled back.
    let cancelled = CancelToken::new();
    cancelled.cancel();
    let other = model
        .prompt_tokens(&[Message::user("Something else entirely.")])
        .expect("renders");
    assert_eq!(session.sync(&other, &cancelled).expect("syncs"), None);
    assert_eq!(session.cached_tokens(), &prompt[..]);
}

#[test]
fn cancellation_stops_within_one_token() {
    let model = support::smollm2();
    for draft in [DraftSource::None, DraftSource::lookup()] {
        let mut session = model.session();
        session.set_draft(draft).expect("draft source");
        let cancel = CancelToken::new();
        let mut pieces = 0;
        let reply = session
            .generate(
                &model
                    .prompt_tokens(&[Message::user("Count from one to fifty.")])
                    .expect("renders"),
                &greedy(40),
                &cancel,
                &mut |_, _| {
                    pieces += 1;
                    if pieces == 3 {
                        cancel.cancel();
                    }
                },
            )
            .expect("generates");
        assert_eq!(reply.stop, StopReason::Cancelled);
        assert_eq!(reply.tokens.len(), 3, "{:?}", reply.text);
        assert_eq!(pieces, 3);
    }
}

fn speculative_equals_plain(draft: DraftSource) -> (usize, usize) {
    let model = support::smollm2();
    // A prompt that invites copying, so lookup proposals get both accepted and rejected.
    let messages = [Message::user(
        "Repeat this list exactly: apples, pears, plums, apples, pears, plums, apples, pears.",
    )];
    let mut plain = model.session();
    let expected = plain
        .reply(&messages, &greedy(28), &CancelToken::new(), &mut |_| {})
        .expect("plain decoding");
    let mut spec = model.session();
    spec.set_draft(draft).expect("draft source");
    let got = spec
        .reply(&messages, &greedy(28), &CancelToken::new(), &mut |_| {})
        .expect("speculative decoding");
    assert_eq!(
        got.tokens, expected.tokens,
        "{:?} vs {:?}",
        got.text, expected.text
    );
    assert_eq!(got.text, expected.text);
    assert_eq!(got.stop, expected.stop);
    assert!(
        got.stats.drafted_tokens > 0,
        "nothing was proposed: {:?} {:?}",
        got.text,
        got.stats
    );
    (got.stats.drafted_tokens, got.stats.accepted_tokens)
}

#[test]
fn greedy_with_prompt_lookup_equals_plain_greedy() {
    // Single-token matches too, so this short reply gets proposals both accepted and rejected.
    let (drafted, accepted) = speculative_equals_plain(DraftSource::Lookup {
        ngram_min: 1,
        ngram_max: 3,
        draft_len: 4,
    });
    assert!(
        accepted > 0,
        "no lookup proposal accepted ({drafted} drafted)"
    );
    assert!(
        accepted < drafted,
        "no lookup proposal rejected ({drafted} drafted)"
    );
}

#[test]
fn greedy_with_draft_model_equals_plain_greedy() {
    // The draft is the Q8_0 re-quantization of the target: same vocabulary, nearly the same
    // distribution, so most proposals are accepted.
    let draft = LocalModel::load(&LocalConfig {
        model: support::smollm2_file(support::Q8_0),
        tokenizer: None,
        load: LoadOptions {
            threads: 2,
            max_context: 1024,
            ..LoadOptions::default()
        },
    })
    .expect("the Q8_0 GGUF loads");
    let (drafted, accepted) = speculative_equals_plain(DraftSource::model(Arc::clone(&draft)));
    assert!(
        accepted > 0,
        "no draft proposal accepted ({drafted} drafted)"
    );
}

#[test]
fn sampled_speculative_decoding_is_reproducible_and_well_formed() {
    let model = support::smollm2();
    let params = GenerateParams {
        max_tokens: 16,
        sampling: Sampling::Sample {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 7,
        },
    };
    let messages = [Message::user("Say hello, hello, hello.")];
    let run = || {
        let mut s = model.session();
        s.set_draft(DraftSource::lookup()).expect("draft source");
        s.reply(&messages, &params, &CancelToken::new(), &mut |_| {})
            .expect("generates")
    };
    let a = run();
    let b = run();
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    assert!(!a.tokens.is_empty());
    assert!(a
        .tokens
        .iter()
        .all(|&t| (t as usize) < model.llama.config.vocab));
    assert!(a.stats.accepted_tokens <= a.stats.drafted_tokens);
}

#[test]
fn end_of_turn_is_likelier_after_a_finished_question() {
    let model = support::smollm2();
    let mut session = model.session();
    let finished = session
        .end_of_turn_probability(&[Message::user("What time is it in Paris?")])
        .expect("computes")
        .expect("the local backend can tell");
    let unfinished = session
        .end_of_turn_probability(&[Message::user("What time is it in")])
        .expect("computes")
        .expect("the local backend can tell");
    assert!((0.0..=1.0).contains(&finished) && (0.0..=1.0).contains(&unfinished));
    assert!(
        finished > unfinished * 10.0,
        "finished {finished}, unfinished {unfinished}"
    );
}

#[test]
fn requantized_q8_0_file_loads_and_agrees_with_the_original() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("smollm2-q8_0.gguf");
    talkline_llm::convert::requantize_gguf_q8_0(&support::smollm2_file(support::Q4_1), &out)
        .expect("converts");
    let q8 = LocalModel::load(&LocalConfig {
        model: out,
        tokenizer: None,
        load: LoadOptions {
            threads: 2,
            max_context: 256,
            ..LoadOptions::default()
        },
    })
    .expect("the converted file loads");
    assert_eq!(q8.llama.source_dtype(), "Q8_0");
    let original = support::smollm2();
    let messages = [Message::user("What is the capital of France?")];
    let prompt = original.prompt_tokens(&messages).expect("renders");
    assert_eq!(q8.prompt_tokens(&messages).expect("renders"), prompt);
    let mut a = original.session();
    let mut b = q8.session();
    let ra = a
        .generate(&prompt, &greedy(8), &CancelToken::new(), &mut |_, _| {})
        .expect("generates");
    let rb = b
        .generate(&prompt, &greedy(8), &CancelToken::new(), &mut |_, _| {})
        .expect("generates");
    assert_eq!(ra.tokens, rb.tokens);
}

#[test]
fn a_lone_session_on_more_threads_gets_the_same_logits() {
    let model = LocalModel::load(&LocalConfig {
        model: support::smollm2_file(support::Q4_1),
        tokenizer: None,
        load: LoadOptions {
            threads: 1,
            solo_threads: 2,
            max_context: 256,
        },
    })
    .expect("loads");
    assert_eq!(model.llama.solo_threads(), 2);
    let prompt = model
        .prompt_tokens(&[Message::user("Is my iron level normal?")])
        .expect("renders");
    let mut alone = model.session();
    assert_eq!(model.llama.current_threads(), 2);
    alone
        .sync(&prompt, &CancelToken::new())
        .expect("syncs")
        .expect("not cancelled");
    // A second open session sends every forward pass back to the one-thread pool.
    let mut beside = model.session();
    assert_eq!(model.llama.current_threads(), 1);
    beside
        .sync(&prompt, &CancelToken::new())
        .expect("syncs")
        .expect("not cancelled");
    assert_eq!(alone.logits(), beside.logits());
    drop(beside);
    assert_eq!(model.llama.current_threads(), 2);
}
