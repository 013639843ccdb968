"""`--engine sglang`'s mapping of OpenAI's sampling parameters onto SGLang's own classes
(0.5.12.post1, on the CPU): penalties, logit_bias, seed and Tactic's target become a
SamplingParams that SGLang verifies and normalises as it would a request's; logprobs are asked
for in a GenerateReqInput SGLang accepts; and the logprob lists SGLang's tokenizer manager writes
into meta_info come back as the engine contract's TokenLogprob entries (that module needs CUDA to
import: its lists are written here in the shape its detokenize_logprob_tokens gives them)."""

import pytest

pytest.importorskip("sglang")

from sglang.srt.managers.io_struct import GenerateReqInput  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams  # noqa: E402

from tactic_server.engine.types import SamplingParams, TacticParams, TokenLogprob  # noqa: E402
from tactic_server.sglang_plugin.engine import (  # noqa: E402
    sglang_sampling_params,
    token_logprobs,
)

VOCAB = 512
EOS = (2,)


def test_penalties_bias_and_seed_reach_sglangs_sampling_params():
    sampling = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, seed=3,
                              presence_penalty=0.5, frequency_penalty=-1.5,
                              logit_bias=((7, -100.0), (11, 42.0)), logprobs=2)  # fmt: skip
    params = SGLangSamplingParams(**sglang_sampling_params(sampling, TacticParams(True, 0.8), 9,
                                                           EOS))  # fmt: skip
    params.verify(VOCAB)
    params.normalize(None)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.5)
    assert params.logit_bias == {"7": -100.0, "11": 42.0}
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 5)
    assert params.sampling_seed == 3 and params.max_new_tokens == 9
    assert params.stop_token_ids == set(EOS)
    assert params.custom_params == {"tactic": {"enabled": True, "target": 0.8}}


def test_greedy_without_extras_leaves_sglangs_defaults():
    params = SGLangSamplingParams(**sglang_sampling_params(
        SamplingParams(max_tokens=4, temperature=0.0), TacticParams(False), 4, EOS))  # fmt: skip
    params.verify(VOCAB)
    assert params.top_k == 1  # SGLang's greedy: temperature 0 becomes top_k 1
    assert params.logit_bias is None and params.frequency_penalty == params.presence_penalty == 0


def test_sglang_refuses_a_bias_for_a_token_beyond_the_vocabulary():
    """The front end refuses it first (400); SGLang would too, so nothing unchecked gets in."""
    sampling = SamplingParams(logit_bias=((VOCAB, 1.0),))
    params = SGLangSamplingParams(**sglang_sampling_params(sampling, TacticParams(), 4, EOS))
    with pytest.raises(ValueError, match="logit_bias"):
        params.verify(VOCAB)


def test_logprob_requests_are_accepted_by_sglangs_request_object():
    request = GenerateReqInput(input_ids=[1, 5, 9], sampling_params={"max_new_tokens": 4},
                               stream=True, rid="r", return_logprob=True,
                               top_logprobs_num=3)  # fmt: skip
    request.normalize_batch_and_arguments()
    assert request.return_logprob and request.top_logprobs_num == 3


def test_meta_info_logprobs_become_token_logprobs():
    """meta_info with every output token so far, as (logprob, token id, text) tuples, text None
    under skip_tokenizer_init; a chunk takes its own tokens' entries."""
    meta_info = {
        "output_token_logprobs": [(-0.1, 17, None), (-0.5, 4, None), (-2.0, 99, None)],
        "output_top_logprobs": [[(-0.1, 17, None), (-2.5, 3, None)],
                                [(-0.5, 4, None), (-1.0, 8, None)],
                                [(-0.3, 6, None), (-2.0, 99, None)]],
    }  # fmt: skip
    assert token_logprobs(meta_info, 1, 3) == (
        TokenLogprob(4, -0.5, ((4, -0.5), (8, -1.0))),
        TokenLogprob(99, -2.0, ((6, -0.3), (99, -2.0))),
    )
    assert token_logprobs({}, 0, 2) == ()  # a request that asked for none
