"""lm-evaluation-harness scores a multiple-choice loglikelihood task through the served
model (`local-completions`: echo with logprobs, token-id prompts in batches) the way it scores
it with `hf` on the same GGUF in this process. The task's data is written here, so nothing is
downloaded."""
import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Ukraine", "Kyiv"),
    ("Switzerland", "Bern"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"), ("Philippines", "Manila"), ("Indonesia", "Jakarta"),
    ("New Zealand", "Wellington"),
]
TASK = """task: capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm_eval_task")
    with open(directory / "capitals.jsonl", "w") as f:
        for i, (country, capital) in enumerate(CAPITALS):
            others = [CAPITALS[(i + k) % len(CAPITALS)][1] for k in (7, 19, 31)]
            choices = others[: i % 4] + [capital] + others[i % 4:]
            f.write(json.dumps({"country": country, "choices": choices, "answer": i % 4}) + "\n")
    (directory / "capitals.yaml").write_text(TASK.format(data=directory / "capitals.jsonl"))
    return directory


def accuracy(task_dir, backend: str, **model_args) -> float:
    from lm_eval.tasks import TaskManager

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    results = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=["capitals"],
                                      task_manager=TaskManager(include_path=str(task_dir)))
    return results["results"]["capitals"]["acc,none"]


def test_local_completions_scores_as_hf_does(live_server, served_model, tokenizer, task_dir,
                                             tmp_path):
    from wattserve.engine.loader import default_model_path

    tokenizer.hf.save_pretrained(tmp_path)
    path = default_model_path()
    hf = accuracy(task_dir, "hf", pretrained=os.path.dirname(path), device="cpu",
                  gguf_file=os.path.basename(path), tokenizer=str(tmp_path), dtype="float32")
    served = accuracy(task_dir, "local-completions", model=served_model, tokenizer=str(tmp_path),
                      base_url=live_server.url + "/v1/completions", batch_size=8,
                      max_retries=1)
    print(f"accuracy: served {served:.3f}, hf {hf:.3f}")
    assert abs(served - hf) * len(CAPITALS) <= 1, (served, hf)  # within one example
    assert served > 0.5  # and the task means something to the model (chance: 0.25)
