"""Prompt-lookup speculative decoding on the CPU: SmolLM2 float32 repeating a Grimm passage (150 greedy tokens),
plain vs ngram twice each (alternating), tokens/s, target steps and acceptance; the outputs must be equal.
Run from the repo root: PYTHONPATH=. python bench/runtime/speculative_cpu.py (needs .device-data/runtime-small from
bench/device/prepare_carry.sh or any text file at that path)."""
import time, torch
from qtool.checkpoints.sources import load_model
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams
torch.manual_seed(0)
l = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
text = open(".device-data/runtime-small/grimm-test.txt").read().split()
passage = " ".join(text[200:330])
msgs = [{"role": "user", "content": "Repeat the following text exactly, word for word:\n\n" + passage}]
prompt = l.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
params = SamplingParams(temperature=0.0, max_tokens=150)
res = {}
for name, cfg in (("plain", EngineConfig()), ("ngram", EngineConfig(speculative="ngram", num_speculative_tokens=6)),
                  ("plain2", EngineConfig()), ("ngram2", EngineConfig(speculative="ngram", num_speculative_tokens=6))):
    eng = Engine(l.model, l.tokenizer, cfg)
    t = time.perf_counter(); out = eng.generate(prompt, params)[0]; dt = time.perf_counter() - t
    st = eng.stats().to_dict()
    res[name] = out.token_ids
    print(name, len(out.token_ids), "tokens", round(len(out.token_ids) / dt, 1), "tok/s", "steps", st["steps"], st.get("speculation"))
print("same tokens:", res["plain"] == res["ngram"])
