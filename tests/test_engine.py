"""The continuous-batching engine without HTTP: requests that join and leave a running batch decode as
they would alone, with their own sampling settings, stop conditions and seeds; cancelled ones free
their slots; the queue drains; bad requests get a clear error. Log-probabilities, for the rows that ask,
are those of a cache-free forward, as are a prompt's scores."""
import pytest
import torch

from llama.engine import ContextLengthError, Engine, SamplingParams
from llama.generation import generate_tokens, stream
from llama.templates import conversation_ids

GREEDY = dict(temperature=0)


def question(tokenizer, text):
    return conversation_ids(tokenizer, [{"role": "user", "content": text}], "chat")


def drain(engine):
    while engine.step():
        pass


@torch.no_grad()
def assert_greedy(model, prompt, tokens, tolerance=1e-4):
    """Each generated token is the argmax (within rounding) of a cache-free forward of everything before it."""
    logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (chosen >= logits.max(dim=1).values - tolerance).all(), (prompt, tokens)


def test_requests_joining_and_leaving_a_running_batch_decode_as_alone(tiny_chat, chat_answers):
    """Seven requests on three slots, submitted while others decode and ending at different steps, so
    that slots are refilled and rows are moved. Every token is checked against a cache-free forward,
    and the answers (decided by wide margins) against generate() alone."""
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=3, context=128)
    questions = list(chat_answers)[:7]
    limits = [60, 5, 60, 12, 60, 3, 60]
    requests = []
    for text, limit in zip(questions, limits):
        requests.append(engine.submit(question(tokenizer, text), SamplingParams(max_tokens=limit, **GREEDY)))
        engine.step()
        engine.step()
    drain(engine)
    for text, limit, request in zip(questions, limits, requests):
        assert_greedy(model, request.prompt, request.tokens)
        alone = "".join(stream(model, tokenizer, request.prompt, max_tokens=limit, **GREEDY))
        assert "".join(event.text for event in request) == alone
        assert request.finish_reason == ("stop" if limit == 60 else "length")
        if limit == 60:
            assert alone == chat_answers[text] + "\n"
    metrics = engine.metrics()
    assert metrics["running"] == metrics["waiting"] == 0 and metrics["prefills"] == 7
    assert max(map(int, metrics["batch_sizes"])) == 3  # full batches: decode steps were shared
    assert metrics["decode_steps"] < sum(r.completion_tokens for r in requests) / 2
    assert metrics["generated_tokens"] == sum(r.completion_tokens for r in requests)


def test_each_request_samples_with_its_own_settings_and_seed_as_generate_does(tiny_chat, chat_answers):
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=4, context=128)
    settings = [dict(temperature=1.3, top_k=20, seed=7), dict(temperature=0.9, top_p=0.8, seed=8),
                dict(temperature=1.0, repetition_penalty=1.3, repetition_penalty_range=5, seed=9)]
    prompts = [question(tokenizer, text) for text in list(chat_answers)[:3]]
    greedy = engine.submit(prompts[0], SamplingParams(max_tokens=30, **GREEDY))  # batched with the sampled ones
    requests = [engine.submit(prompt, SamplingParams(max_tokens=30, **s)) for prompt, s in zip(prompts, settings)]
    drain(engine)
    assert_greedy(model, greedy.prompt, greedy.tokens)
    for prompt, s, request in zip(prompts, settings, requests):
        alone = [int(t) for t in generate_tokens(model, [prompt], max_tokens=30, stop_ids=tokenizer.stop_ids, **s)]
        assert request.tokens == alone[:len(request.tokens)]
        assert len(request.tokens) == len(alone) or alone[len(request.tokens) - 1] in tokenizer.stop_ids


def test_stop_strings_end_of_turn_and_max_tokens_end_a_request_with_exact_counts(tiny_chat):
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=4, context=128)
    prompt = question(tokenizer, "What color is the sky?")
    answer = tokenizer.encode("The sky is blue on a clear day.\n")
    natural = engine.submit(prompt, SamplingParams(**GREEDY))
    stopped = engine.submit(prompt, SamplingParams(stop=("zebra", "blue"), **GREEDY))
    short = engine.submit(prompt, SamplingParams(max_tokens=3, **GREEDY))
    on = engine.submit(prompt, SamplingParams(max_tokens=len(answer) + 4, ignore_eos=True, **GREEDY))
    drain(engine)
    assert (natural.text(), natural.finish_reason) == ("The sky is blue on a clear day.\n", "stop")
    assert natural.tokens == answer + [tokenizer.eot_id]  # the end-of-turn token counts: the model generated it
    assert (stopped.text(), stopped.finish_reason) == ("The sky is ", "stop")
    assert (short.text(), short.finish_reason, short.tokens) == (tokenizer.decode(answer[:3]), "length", answer[:3])
    assert on.finish_reason == "length" and on.completion_tokens == len(answer) + 4
    assert on.tokens[:len(answer) + 1] == answer + [tokenizer.eot_id]
    assert natural.prompt_tokens == len(prompt)


@torch.no_grad()
def local_logprobs(model, ids):
    """log_softmax of a cache-free forward over ids: row i is the distribution of token i + 1."""
    return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


def test_logprobs_are_the_raw_distributions_of_the_rows_that_ask(tiny_chat, chat_answers):
    """Three requests decode together: one greedy asking for the top 3, one sampled with a repetition
    penalty asking for 0 (its logprobs are still the raw model's), one asking for none (it gets none).
    Each entry equals a cache-free forward's log_softmax, and so does score() of the whole sequence."""
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=4, context=128)
    prompts = [question(tokenizer, text) for text in list(chat_answers)[:3]]
    greedy = engine.submit(prompts[0], SamplingParams(logprobs=3, **GREEDY))
    sampled = engine.submit(prompts[1], SamplingParams(max_tokens=20, temperature=1.2, repetition_penalty=1.5, seed=4,
                                                       logprobs=0))
    plain = engine.submit(prompts[2], SamplingParams(**GREEDY))
    drain(engine)
    for request, top in ((greedy, 3), (sampled, 0)):
        ends = request.finish_reason == "stop" and request.tokens[-1] == tokenizer.eot_id
        kept = request.tokens[:len(request.tokens) - ends]  # the end-of-turn that ends it has no entry
        assert [entry.token for entry in request.logprobs] == kept and kept
        local = local_logprobs(model, request.prompt + kept)[len(request.prompt) - 1:]
        for at, entry in enumerate(request.logprobs):
            assert abs(entry.logprob - float(local[at, entry.token])) < 1e-4
            values, ids = local[at].topk(top) if top else (torch.empty(0), torch.empty(0))
            assert [i for i, _ in entry.top] == ids.tolist()
            assert torch.allclose(torch.tensor([v for _, v in entry.top]), values, atol=1e-4)
        scored = engine.score(request.prompt + kept, top)[len(request.prompt) - 1:]
        assert [s.token for s in scored] == kept and [[i for i, _ in s.top] for s in scored] == \
            [[i for i, _ in e.top] for e in request.logprobs]
        assert max(abs(s.logprob - e.logprob) for s, e in zip(scored, request.logprobs)) < 1e-4
    assert all(greedy_entry.top[0][0] == greedy_entry.token for greedy_entry in greedy.logprobs)
    events = list(greedy)
    assert [e for event in events for e in event.logprobs] == greedy.logprobs  # each with its event's text
    assert "".join(tokenizer.decode([e.token]) for e in greedy.logprobs) == "".join(event.text for event in events)
    assert plain.logprobs == [] and all(event.logprobs == () for event in plain)
    assert engine.score(prompts[0][:1]) == [] and len(engine.score(prompts[0])) == len(prompts[0]) - 1


def test_a_cancelled_request_frees_its_slot_for_the_next_in_the_queue(tiny_chat):
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=1, context=256)
    prompt = question(tokenizer, "Tell me a story.")
    first = engine.submit(prompt, SamplingParams(max_tokens=100, ignore_eos=True, **GREEDY))
    second = engine.submit(prompt, SamplingParams(max_tokens=5, **GREEDY))
    queued = engine.submit(prompt, SamplingParams(max_tokens=5, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.metrics()["running"] == 1 and engine.metrics()["waiting"] == 2
    first.cancel()
    queued.cancel()  # cancelled while still waiting: it never takes a slot
    drain(engine)
    assert first.finish_reason == "cancelled" and 0 < first.completion_tokens < 100
    assert second.finish_reason == "length" and second.completion_tokens == 5
    assert queued.finish_reason == "cancelled" and queued.completion_tokens == 0
    assert engine.metrics()["finished"] == {"stop": 0, "length": 1, "cancelled": 2, "error": 0}
    assert engine.metrics()["prefills"] == 2


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_the_engines_thread_decodes_with_the_threads_it_was_started_with(tiny_chat, threads):
    """start(threads) sets the engine thread's own intra-op threads (by default the caller's count): serve.py
    keeps its main thread at one, so that the engine's is the one OpenMP pool (see Engine.start)."""
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=2, context=256)
    seen, decode = [], engine._decode
    engine._decode = lambda: seen.append(torch.get_num_threads()) or decode()
    caller = torch.get_num_threads()
    with engine.start(threads):
        engine.submit(question(tokenizer, "Hi"), SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY)).text()
    assert seen == [caller if threads is None else threads]  # the first token comes from the prefill
    assert torch.get_num_threads() == caller


def test_closing_the_running_engine_ends_every_request_with_the_reason(tiny_chat):
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=2, context=256).start()
    prompt = question(tokenizer, "Tell me a story.")
    requests = [engine.submit(prompt, SamplingParams(max_tokens=200, ignore_eos=True, **GREEDY)) for _ in range(4)]
    next(iter(requests[0]))  # decoding has begun
    engine.close("closed by the test")
    for request in requests[1:]:
        with pytest.raises(RuntimeError, match="^closed by the test$"):
            request.text()
    events = list(requests[0])
    assert events[-1].finish_reason == "error" and events[-1].error == "closed by the test"
    assert all(event.finish_reason is None for event in events[:-1])
    with pytest.raises(RuntimeError, match="^the engine is closed: closed by the test$"):
        engine.submit(prompt)


def test_bad_requests_get_a_clear_error(tiny_chat):
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=2, context=32)
    with pytest.raises(ContextLengthError, match=r"^the prompt has 32 tokens, but the context holds 32 \(prompt and "
                                                 r"answer together\); shorten the prompt$") as error:
        engine.submit([5] * 32)
    assert error.value.field == "prompt"
    with pytest.raises(ContextLengthError, match=r"^the prompt has 30 tokens and max_tokens is 5, 35 in all, but "
                                                 r"the context holds 32; lower max_tokens to 2 or less$") as error:
        engine.submit([5] * 30, SamplingParams(max_tokens=5))
    assert error.value.field == "max_tokens"
    with pytest.raises(ValueError, match=r"^token id 300 is out of range for vocab_size 300$"):
        engine.submit([5, 300])
    with pytest.raises(ValueError, match=r"^the prompt is empty; give at least one token$"):
        engine.submit([])
    with pytest.raises(ValueError, match=r"^token id -1 is out of range for vocab_size 300$"):
        engine.score([5, -1])
    with pytest.raises(ContextLengthError, match=r"^the prompt has 33 tokens, but the context holds 32; shorten"):
        engine.score([5] * 33)
    assert len(engine.score([5] * 32)) == 31  # scoring needs no room for an answer
    with pytest.raises(ValueError, match=r"^logprobs must be >= 0 \(the number of most likely tokens to give\), "
                                         r"got -1$"):
        SamplingParams(logprobs=-1)
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"^a stop string needs some text"):
        SamplingParams(stop=("",))
    with pytest.raises(ValueError, match=r"^temperature must be a finite number, got nan$"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"^repetition_penalty must be a finite number, got inf$"):
        SamplingParams(repetition_penalty=float("inf"))
    with pytest.raises(ValueError, match=r"^seed must be in \[-2\*\*63, 2\*\*64\), got 18446744073709551616$"):
        SamplingParams(seed=2**64)
    with pytest.raises(ValueError, match=r"^context must be in \[2, 256\] \(the model's max_seq_len\), got 512$"):
        Engine(model, tokenizer, context=512)
    with pytest.raises(ValueError, match=r"^max_batch must be >= 1, got 0$"):
        Engine(model, tokenizer, max_batch=0)


def test_one_request_that_fails_ends_alone_and_the_batch_goes_on(tiny_chat, chat_answers, monkeypatch):
    """A request whose sampling raises ends with an error event; the requests decoding beside it finish
    as they would alone. A temperature so small that logits overflow samples the top token (no NaN)."""
    import llama.engine as engine_module

    model, tokenizer = tiny_chat
    real = engine_module.sample_next

    def sample_next(logits, recent, *, temperature, **options):
        if temperature == 0.5:
            raise RuntimeError("this request's sampling broke")
        return real(logits, recent, temperature=temperature, **options)

    monkeypatch.setattr(engine_module, "sample_next", sample_next)
    engine = Engine(model, tokenizer, max_batch=4, context=128)
    texts = list(chat_answers)[:3]
    good = [engine.submit(question(tokenizer, t), SamplingParams(max_tokens=60, **GREEDY)) for t in texts[:2]]
    tiny = engine.submit(question(tokenizer, texts[2]), SamplingParams(max_tokens=60, temperature=1e-40, seed=1))
    engine.step()
    engine.step()  # the good ones are decoding when the bad one joins
    bad = engine.submit(question(tokenizer, texts[0]), SamplingParams(max_tokens=60, temperature=0.5))
    drain(engine)
    assert (bad.finish_reason, bad.error) == ("error", "generation failed: RuntimeError: this request's sampling "
                                                        "broke")
    for text, request in zip(texts, [*good, tiny]):
        assert (request.text(), request.finish_reason) == (chat_answers[text] + "\n", "stop")
    assert engine.metrics()["running"] == 0 and engine.metrics()["finished"]["error"] == 1


def test_requests_admitted_together_with_one_prompt_share_its_prefill_and_sample_as_alone(tiny_chat, chat_answers):
    """n samples of one prompt (GRPO's group): the prompt runs through the model once, each other request
    copies its cache row and last logits in the same step, and each seeded request samples what it samples
    alone."""
    model, tokenizer = tiny_chat
    prompts = [question(tokenizer, text) for text in list(chat_answers)[:2]]
    params = [SamplingParams(max_tokens=12, temperature=1.5, seed=seed) for seed in range(6)]
    alone = []
    for prompt in prompts:
        for p in params:
            engine = Engine(model, tokenizer, max_batch=1, context=128)
            request = engine.submit(prompt, p)
            drain(engine)
            alone.append(request.tokens)
    engine = Engine(model, tokenizer, max_batch=12, context=128)
    together = [engine.submit(prompt, p) for prompt in prompts for p in params]
    engine.step()
    assert engine.metrics()["prefills"] == 12 and engine.metrics()["batch_sizes"] == {"12": 1}  # all in one step
    drain(engine)
    assert [r.tokens for r in together] == alone
    metrics = engine.metrics()
    assert metrics["prefill_steps"] == 1 and metrics["prefill_tokens"] == sum(len(p) for p in prompts)
    assert metrics["reused_tokens"] == 5 * sum(len(p) for p in prompts)
    assert len({tuple(t) for t in alone}) > 2  # the seeds differ: so would the samples of a wrong cache row


def conversation(tokenizer, *turns):
    """The chat prompt of alternating user and assistant turns, ending with the cue for the next answer."""
    roles = ["user", "assistant"] * len(turns)
    return conversation_ids(tokenizer, [{"role": r, "content": t} for r, t in zip(roles, turns)], "chat")


def alone(model, tokenizer, prompt, params):
    """The request run on an engine of its own, cold: one forward over the whole prompt."""
    engine = Engine(model, tokenizer, max_batch=1, context=256, prefill_chunk=256)
    request = engine.submit(prompt, params)
    drain(engine)
    assert engine.metrics()["reused_tokens"] == 0 and engine.metrics()["prefill_steps"] == 1
    return request


def assert_same(request, cold):
    """The same tokens, and log-probabilities equal to float rounding."""
    assert request.tokens == cold.tokens
    assert [e.token for e in request.logprobs] == [e.token for e in cold.logprobs]
    for ours, theirs in zip(request.logprobs, cold.logprobs):
        assert abs(ours.logprob - theirs.logprob) < 1e-5
        assert [i for i, _ in ours.top] == [i for i, _ in theirs.top]
        assert max(abs(a - b) for (_, a), (_, b) in zip(ours.top, theirs.top)) < 1e-5


def test_a_long_prompt_prefills_in_chunks_while_the_others_decode_every_step(tiny_chat, chat_answers):
    """With an 8-token budget, a third turn's long prompt takes one chunk per step and the stream running
    beside it gets a token at every one of those steps; a short prompt that arrives meanwhile gets its
    first token the step it is admitted (the oldest prompt takes at most half the budget). Each answer is
    what a cold one-forward prefill gives."""
    model, tokenizer = tiny_chat
    questions = list(chat_answers)
    engine = Engine(model, tokenizer, max_batch=3, context=256, prefill_chunk=8)
    params = SamplingParams(max_tokens=100, ignore_eos=True, **GREEDY)
    running = engine.submit(question(tokenizer, "Tell me a story."), params)
    while not running.tokens:
        engine.step()
    long = conversation(tokenizer, questions[0], chat_answers[questions[0]], questions[1], chat_answers[questions[1]],
                        questions[2])
    short = [5, 17, 42, 9]
    long_params = SamplingParams(max_tokens=12, logprobs=2, **GREEDY)
    first = engine.submit(long, long_params)
    steps, reused = 0, engine.metrics()["reused_tokens"]
    while not first.tokens:
        tokens, prefilled = len(running.tokens), engine.metrics()["prefill_tokens"]
        engine.step()
        steps += 1
        assert len(running.tokens) == tokens + 1  # the running stream never waits for the whole prompt
        assert engine.metrics()["prefill_tokens"] - prefilled <= 8
        if steps == 2:
            late = engine.submit(short, SamplingParams(max_tokens=3, logprobs=2, **GREEDY))
        if steps == 3:
            assert late.tokens and engine.metrics()["prefill_tokens"] - prefilled == 8  # 4 each
    reused = engine.metrics()["reused_tokens"] - reused  # the template's first tokens, held by the running row
    assert steps == -(-(len(long) - reused + len(short)) // 8) and len(long) - reused > 8 * 8
    drain(engine)
    assert_same(first, alone(model, tokenizer, long, long_params))
    assert_same(late, alone(model, tokenizer, short, late.params))
    assert running.tokens == alone(model, tokenizer, running.prompt, params).tokens


def test_a_prompt_reuses_the_longest_prefix_a_row_holds_even_after_its_request_ended(tiny_chat, chat_answers):
    """The next turn of a finished conversation copies the first prompt and its answer from the row the first
    request left (kept there while another request used the other row), and prefills only the rest; its
    tokens and log-probabilities equal a cold prefill's. The same prompt again reuses all but its last token."""
    model, tokenizer = tiny_chat
    q1, q2 = list(chat_answers)[:2]
    engine = Engine(model, tokenizer, max_batch=2, context=256)
    params = SamplingParams(logprobs=3, **GREEDY)
    earlier = engine.submit(conversation(tokenizer, q1), params)
    drain(engine)
    other = engine.submit(question(tokenizer, "Count to ten."), params)  # takes the other, least recently used row
    drain(engine)
    follow_up = conversation(tokenizer, q1, chat_answers[q1], q2)
    held = earlier.prompt + earlier.tokens[:-1]  # the row holds everything but the final end-of-turn token
    shared = next(i for i, (a, b) in enumerate(zip(held + [-1], follow_up)) if a != b)
    assert shared > len(earlier.prompt) + 5  # the answer too
    before = engine.metrics()
    again = engine.submit(follow_up, params)
    drain(engine)
    after = engine.metrics()
    assert after["reused_tokens"] - before["reused_tokens"] == shared
    assert after["prefill_tokens"] - before["prefill_tokens"] == len(follow_up) - shared
    assert_same(again, alone(model, tokenizer, follow_up, params))
    assert again.text() == chat_answers[q2] + "\n" and other.text() == chat_answers["Count to ten."] + "\n"
    repeat = engine.submit(follow_up, params)
    drain(engine)
    assert engine.metrics()["prefill_tokens"] - after["prefill_tokens"] == 1
    assert_same(repeat, again)


def test_groups_are_admitted_in_turn_so_one_of_many_prompts_does_not_wait_for_all(tiny_chat):
    model, tokenizer = tiny_chat
    engine = Engine(model, tokenizer, max_batch=1, context=128)
    ended = []

    def submit(name, group):
        return engine.submit([5, 6, 7], SamplingParams(max_tokens=2, **GREEDY), group=group,
                             listener=lambda event: ended.append(name) if event.finish_reason else None)

    for i in range(4):
        submit(f"big{i}", "big")
    submit("small", "small")
    submit("alone", None)
    submit("big4", "big")
    drain(engine)
    assert ended == ["big0", "small", "alone", "big1", "big2", "big3", "big4"]
