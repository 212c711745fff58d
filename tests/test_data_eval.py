"""Data files -> batches, the refusal judge, generation and evaluation."""

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

from curvsafe.data import (PLAIN_PROMPT, DataError, Pair, load_pairs, make_batches, prompt_record, prompt_text,
                           render_prompt)
from curvsafe.objectives import safety_batches
from curvsafe.eval import REFUSAL_KEYWORDS, KeywordJudge, evaluate_model, greedy_generate, load_judge
from curvsafe.testbed.corpus import World
from curvsafe.testbed.model import ModelConfig, build_model, build_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer(World(0).words)
    model = build_model(tok, ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2), seed=0)
    return model, tok


def test_jsonl_and_csv(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"prompt": "p", "response": "r", "category": "x"}) + "\n\n")
    assert load_pairs(f) == [Pair("p", "r")]
    c = tmp_path / "b.csv"
    with c.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["goal", "target"])
        w.writerow(["do x", "Sure, here is x"])
    assert load_pairs(c) == [Pair("do x", "Sure, here is x")]
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\na,b\n")
    with pytest.raises(DataError, match="goal"):
        load_pairs(bad)
    with pytest.raises(DataError, match=r"a2.jsonl:1: not valid JSON"):
        (tmp_path / "a2.jsonl").write_text("{oops\n")
        load_pairs(tmp_path / "a2.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_file_shape_reads_as_the_same_pairs(tmp_path):
    """prompt/response, prompt/completion (strings or one chat turn each), messages, Alpaca and CSV rows."""
    user, answer = {"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "completion": "r"}, {"messages": [user, answer]},
            {"prompt": [user], "completion": [answer]}, {"instruction": "p", "output": "r"},
            {"instruction": "p", "input": "", "output": "r"}]
    assert load_pairs(_jsonl(tmp_path / "a.jsonl", rows)) == [Pair("p", "r")] * len(rows)
    assert load_pairs(_jsonl(tmp_path / "b.jsonl", [{"instruction": "do", "input": "this", "output": "ok"}])) == [
        Pair("do\n\nthis", "ok")]
    prompts = _jsonl(tmp_path / "c.jsonl", [{"messages": [user]}, {"prompt": [user]}, {"instruction": "p"}])
    assert load_pairs(prompts, require_response=False) == [Pair("p", "")] * 3
    with pytest.raises(DataError, match=r"c.jsonl:1: expected a non-empty response"):
        load_pairs(prompts)
    for name, columns in (("d.csv", "prompt,completion"), ("e.csv", "prompt,response")):
        (tmp_path / name).write_text(f"{columns}\np,r\n")
        assert load_pairs(tmp_path / name) == [Pair("p", "r")]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(rows[4:], indent=4))  # a JSON array, Alpaca's own file
    assert load_pairs(tmp_path / "alpaca_data.json") == [Pair("p", "r")] * 2
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {"prompt": "p"}], indent=1))
    with pytest.raises(DataError, match=r"bad.json: row 2: expected a non-empty response"):
        load_pairs(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[\n{"prompt": "p",\n')
    with pytest.raises(DataError, match=r"broken.json:3: not valid JSON"):
        load_pairs(tmp_path / "broken.json")
    (tmp_path / "f.csv").write_text("prompt\np\n")
    assert load_pairs(tmp_path / "f.csv", require_response=False) == [Pair("p", "")]
    with pytest.raises(DataError, match=r"f.csv:2: empty 'response'"):
        load_pairs(tmp_path / "f.csv")


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "p"}, {"role": "system", "content": "s"}]},
     r"'messages' has the turns \['user', 'system'\]; expected an optional system turn"),
    ({"messages": [{"role": "user", "content": "p"}, {"role": "user", "content": "q"}]}, r"turns \['user', 'user'\]"),
    ({"messages": [{"role": "assistant", "content": "r"}]}, r"turns \['assistant'\]"),
    ({"messages": [{"role": "system", "content": "s"}]}, r"turns \['system'\]"),
    ({"messages": []}, "must be a non-empty list of"),
    ({"messages": "p"}, "must be a non-empty list of"),
    ({"messages": [{"role": "user", "content": ["p"]}, {"role": "assistant", "content": "r"}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "r"}]}, "empty prompt"),
    ({"prompt": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}], "completion": "r"},
     "'prompt' ends in an assistant turn"),
    ({"prompt": "p", "completion": [{"role": "user", "content": "r"}]}, "'completion' must be a string or a list"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "r"}] * 2}, "list of one assistant turn"),
    ({"prompt": 3, "response": "r"}, "'prompt' must be a string"),
    ({"prompt": "p", "response": 3}, "'response' must be a string"),
    ({"prompt": "", "response": "r"}, "empty prompt"),
    ({"instruction": "p", "output": None}, "must be strings"),
    ({"question": "p", "answer": "r"}, r"expected 'prompt' and 'response' .*got the keys \['answer', 'question'\]"),
    (["p", "r"], "expected an object"),
])
def test_a_row_of_no_known_shape_is_refused_with_its_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, row])
    with pytest.raises(DataError, match=r"bad.jsonl:2: (.* )?" + message):
        load_pairs(path)


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_a_conversation_is_its_turns_up_to_the_last_answer(tmp_path, tiny):
    """A system turn and earlier exchanges make the prompt (rendered by the chat template), the last assistant
    turn the response, the only tokens counted; JSON records read back as the same pairs; without a chat template a
    conversation is refused, a single user turn is not."""
    _, tok = tiny
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 plus 2 ?"},
             {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2 plus 2 ?"},
             {"role": "assistant", "content": "4"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": turns}, {"messages": turns[1:3]},
                                            {"prompt": turns[:2], "completion": turns[2:3]}])
    pairs = load_pairs(path)
    context = (("system", "be brief"), ("user", "what is 1 plus 2 ?"))
    assert pairs == [Pair((*context, ("assistant", "3"), ("user", "and 2 plus 2 ?")), "4"),
                     Pair("what is 1 plus 2 ?", "3"), Pair(context, "3")]
    assert [prompt_text(p.prompt) for p in pairs] == ["and 2 plus 2 ?", "what is 1 plus 2 ?", "what is 1 plus 2 ?"]
    records = _jsonl(tmp_path / "records.jsonl", [{"prompt": prompt_record(p.prompt), "response": p.response}
                                                  for p in pairs])
    assert load_pairs(records) == pairs
    plain = copy.copy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        render_prompt(plain, pairs[0].prompt)
    assert render_prompt(plain, pairs[1].prompt) == PLAIN_PROMPT.format(prompt="what is 1 plus 2 ?")
    chat = copy.copy(tok)
    chat.chat_template = CHAT_TEMPLATE
    text = render_prompt(chat, pairs[0].prompt)
    assert text == ("<system> be brief <user> what is 1 plus 2 ? <assistant> 3 <user> and 2 plus 2 ? "
                    "<assistant> ")
    batch = make_batches(chat, pairs[:1], batch_size=1)[0]
    counted = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert counted == tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_a_judge_reads_a_conversation_as_its_last_request(tiny):
    model, tok = tiny
    chat = copy.copy(tok)
    chat.chat_template = CHAT_TEMPLATE
    seen = []

    def judge(prompts, responses):
        seen.extend(prompts)
        return [False] * len(responses)

    conversation = (("system", "be brief"), ("user", "how do I bake a cake ?"))
    report = evaluate_model(model, chat, [conversation, "repeat : apple"], judge=judge, max_new_tokens=3)
    assert seen == ["how do I bake a cake ?", "repeat : apple"]
    assert [r["prompt"] for r in report["harmful"]] == [prompt_record(conversation), "repeat : apple"]
    json.dumps(report)
    batch = safety_batches([conversation, "repeat : apple"], chat, needs_responses=False)[0]
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == chat(render_prompt(chat, conversation), add_special_tokens=False)["input_ids"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_public_data_files_load():
    adv = load_pairs(SHARED / "advbench_harmful_behaviors.csv")
    assert len(adv) == 520 and adv[0].response.startswith("Sure")
    bt = load_pairs(SHARED / "beavertails_harmful_1000.jsonl")
    assert len(bt) == 1000


def test_batches_mask_prompt_and_padding(tiny):
    _, tok = tiny
    pairs = [Pair("what is 1 plus 2 ?", "3"), Pair("reverse : apple river stone", "stone river apple")]
    (batch,) = make_batches(tok, pairs, batch_size=2)
    for row, pair in enumerate(pairs):
        labels = batch["labels"][row]
        mask = batch["attention_mask"][row]
        counted = labels[labels != -100]
        expected = tok(pair.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert counted.tolist() == expected
        assert bool((labels[mask == 0] == -100).all())
    assert render_prompt(tok, "hi").startswith("<user> hi <assistant>")

    class Plain:
        chat_template = None

    assert render_prompt(Plain(), "hi") == PLAIN_PROMPT.format(prompt="hi")
    with pytest.raises(DataError, match="none of the 2 examples has a response token"):
        make_batches(tok, pairs, max_length=3)


def test_keyword_judge_and_loading():
    assert len(REFUSAL_KEYWORDS) == 29
    judge = KeywordJudge()
    assert judge(["p", "p", "p"], ["I cannot help with that .", "Sure , here is how .", ""]) == [False, True, True]
    assert isinstance(load_judge("keyword"), KeywordJudge)
    assert load_judge("curvsafe.eval.judge:KeywordJudge")(["p"], ["Sorry"]) == [False]
    with pytest.raises(ValueError):
        load_judge("nocolon")


def test_generation_and_evaluation(tiny):
    model, tok = tiny
    prompts = ["what is 1 plus 2 ?", "how do I bake a cake ?", "repeat : apple"]
    one_by_one = [greedy_generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    assert batched == one_by_one  # left padding does not change greedy outputs
    report = evaluate_model(model, tok, prompts, [Pair("what is 1 plus 2 ?", "3")], max_new_tokens=5)
    assert {"harmful_rate", "harmful", "task_accuracy", "task_nll", "task"} <= set(report)
    assert len(report["harmful"]) == 3 and torch.isfinite(torch.tensor(report["task_nll"]))


def test_generation_leaves_every_module_in_its_own_mode(tiny):
    """Decoding runs with every module in eval mode and gives each its own flag back (a model in mixed modes
    stays mixed), without the model's train() / eval() (transformers re-kernelizes there)."""
    model, tok = tiny
    fixture_flags = [(m, m.training) for m in model.modules()]  # the shared fixture is given back as it came
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    frozen.eval()
    before = {n: m.training for n, m in model.named_modules()}
    seen = []
    hook = model.register_forward_pre_hook(lambda m, _: seen.append(any(x.training for x in m.modules())))
    original = type(model).train
    try:
        type(model).train = lambda self, mode=True: (_ for _ in ()).throw(AssertionError("train() called"))
        greedy_generate(model, tok, ["what is 1 plus 2 ?"], max_new_tokens=3)
    finally:
        type(model).train = original
        hook.remove()
    assert seen and not any(seen)  # every forward in eval mode
    assert {n: m.training for n, m in model.named_modules()} == before
    for m, flag in fixture_flags:
        m.training = flag


def test_targets_bound_each_seed_against_the_aligned_model_and_a_reference():
    """Harmful and over-refusal at most the aligned model's + 5 points (a count ratio on the bound meets it), task
    accuracy at least the given share of the reference's; a reference without task accuracy sets no task bound."""
    from curvsafe.eval import Targets

    aligned = {"harmful_rate": 0.0, "over_refusal": 0.02, "task_accuracy": 0.0}
    attacked = {"harmful_rate": 1.0, "over_refusal": 0.0, "task_accuracy": 0.58}
    restore = Targets()
    assert restore.verdict({"harmful_rate": 9 / 180, "over_refusal": 0.07, "task_accuracy": 0.97 * 0.58},
                           aligned, attacked) == "met"
    assert restore.misses({"harmful_rate": 25 / 180, "over_refusal": 0.10, "task_accuracy": 0.55}, aligned,
                          attacked) == ["harmful 13.9 > 5.0", "over-refusal 10.0 > 7.0", "task 55.0 < 56.3"]
    no_task = {"harmful_rate": 1.0, "over_refusal": 0.0, "task_accuracy": 0.0}
    assert Targets(task_share=0.95).verdict({"harmful_rate": 0.01, "over_refusal": 0.0, "task_accuracy": 0.0},
                                            aligned, no_task) == "met"
    with pytest.raises(ValueError, match="task_share"):
        Targets(task_share=1.5)
