"""The shared request type: sampling-parameter normalisation and budgets."""

from serve_app.domain import SamplingParams


class TestSamplingParams:
    def test_max_new_tokens_wins_over_max_length(self):
        p = SamplingParams(max_new_tokens=5, max_length=100)
        assert p.budget(10) == 5
        assert p.normalized().max_length is None

    def test_max_length_is_total_tokens(self):
        assert SamplingParams(max_length=30).budget(12) == 18

    def test_default_budget(self):
        assert SamplingParams().budget(3) == 50
        assert SamplingParams().normalized().max_new_tokens == 50

    def test_greedy_drops_sampling_knobs(self):
        assert SamplingParams(top_p=0.5, seed=3).normalized() == SamplingParams(max_new_tokens=50)

    def test_deterministic(self):
        assert SamplingParams().deterministic
        assert SamplingParams(temperature=0.7, seed=1).deterministic
        assert not SamplingParams(temperature=0.7).deterministic

    def test_a_vanishing_temperature_is_greedy(self):
        for tiny in (1.25e-239, 5e-324, 9e-6):
            assert SamplingParams(temperature=tiny).greedy
            assert SamplingParams(temperature=tiny, seed=3).normalized() == SamplingParams(
                max_new_tokens=50
            )
        assert not SamplingParams(temperature=1e-5).greedy
