"""The progress hook kdcache hands to vLLM's ``use_tqdm``, called both ways vLLM calls it."""
from vllm.utils.tqdm_utils import maybe_tqdm

from kdcache.progress import EngineProgress


def test_engine_progress_passes_rendered_prompts_through_and_counts_finished_requests():
    counted: list[int] = []
    use_tqdm = EngineProgress.factory(counted.append)
    prompts = [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    # vLLM wraps the prompts it renders with use_tqdm(prompts, desc=...): they must come back whole
    assert list(maybe_tqdm(prompts, use_tqdm=use_tqdm, desc="Rendering prompts")) == prompts
    bar = use_tqdm(total=2, desc="Processed prompts")
    bar.update(1)
    bar.update(1)
    assert counted == [1, 1] and bar.n == 2


def test_engine_progress_without_callback_is_off():
    assert EngineProgress.factory(None) is False
