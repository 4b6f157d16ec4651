"""What a trial holds and how many run at once: the limit follows the cluster as it grows."""

import ray
from ray.tune.search import ConcurrencyLimiter, Searcher

from tune_xray.driver import this_driver
from tune_xray.trial import ClusterConcurrency, TrialResources


class Configs(Searcher):
    def suggest(self, trial_id):
        return {"trial": trial_id}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def test_trials_placeable_count_cpus_and_gpus():
    assert TrialResources(cpus=2).placeable({"CPU": 1}) == 0
    assert TrialResources(cpus=2).placeable({"CPU": 5}) == 2
    assert TrialResources(cpus=1, gpus=0.5).placeable({"CPU": 16, "GPU": 2}) == 4
    assert TrialResources(workers=2, cpus=8, gpus=2).placeable({"CPU": 64, "GPU": 3}) == 1


def test_the_concurrency_limit_follows_the_cluster(monkeypatch):
    """As many trials as the cluster holds now and one waiting (an autoscaler sees its request), read again at
    every suggestion: a cluster that starts with no room and grows runs more at once."""
    cluster = {"CPU": 1}
    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": cluster}])
    limiter = TrialResources(cpus=2).limiter(Configs(), pending=1)
    assert isinstance(limiter, ClusterConcurrency)
    assert limiter.suggest("a") == {"trial": "a"}  # none fits: one waits
    assert limiter.suggest("b") is None
    cluster["CPU"] = 5  # a node joined: two fit, one more may wait
    assert limiter.suggest("b") == {"trial": "b"} and limiter.suggest("c") == {"trial": "c"}
    assert limiter.suggest("d") is None
    limiter.on_trial_complete("a")
    assert limiter.suggest("d") == {"trial": "d"}


def test_max_concurrent_is_a_fixed_cap_a_resume_may_change():
    import pickle

    limiter = TrialResources().limiter(Configs(), cap=3)
    assert isinstance(limiter, ConcurrencyLimiter) and limiter.max_concurrent == 3
    restored = pickle.loads(pickle.dumps(limiter))
    with this_driver(concurrency=(TrialResources(), None, 1)):
        assert restored.suggest("a") == {"trial": "a"} and restored.suggest("b") is None


def test_as_many_wait_as_one_new_node_can_start_and_a_resume_runs_on_its_own_resources(monkeypatch):
    """Waiting trials: by default as many as one node like the cluster's largest starts (an autoscaler then adds
    that many nodes' worth at once, not one per start cycle), or --max-pending; a resumed search's limit follows the
    resources it is given, not those its limiter was pickled with."""
    import pickle

    nodes = [{"Alive": True, "Resources": {"CPU": 1}}, {"Alive": True, "Resources": {"CPU": 8}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 9})
    limiter = TrialResources(cpus=2).limiter(Configs())
    assert limiter._limit() == 4 + 4  # four run, four wait: what one more 8-CPU node would start
    assert TrialResources(cpus=2).limiter(Configs(), pending=1)._limit() == 5
    restored = pickle.loads(pickle.dumps(limiter))
    with this_driver(concurrency=(TrialResources(cpus=4), 0, None)):
        assert restored._limit() == 2  # the resume's 4 CPUs per trial
    with this_driver(concurrency=(TrialResources(cpus=4), 0, 1)):
        assert restored._limit() == 1  # the resume's --max-concurrent 1
    assert restored._limit() == 8
