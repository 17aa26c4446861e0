"""The Ray actor on a real cluster: device profile, and a trial whose reports we answer."""

import ray

from search.run.dataset import build_payload
from search.space import load_space
from workers import Decision, EventKind, Outcome, TrialRequest, start_worker


def test_actor_profile_and_a_trial_answered_through_the_long_poll(ray_cluster, tmp_path):
    space = load_space("smoke")
    config = space.decode({"unet.base_width": 8, "unet.activation": "relu",
                           "schedule.sampler": "euler", "schedule.steps": 2,
                           "train.learning_rate": 2e-3})
    request = TrialRequest(3, 0, config.to_dict(), (10, 30), fid_samples=16, grid_images=4,
                           latency_rounds=2)
    data = ray.put(build_payload(space.data, tmp_path))
    actor = start_worker("probe")
    try:
        profile = ray.get(actor.profile.remote())
        assert profile["worker"] == "probe" and profile["backend"] in ("cpu", "metal", "cuda")
        assert {"chip", "memory_gb", "mlx", "blas", "node_id", "pid"} <= set(profile)
        result = actor.run_trial.remote(request, data)
        kinds, running = [], None
        while not ray.wait([result], timeout=0)[0]:
            for event in ray.get(actor.next_events.remote(0.5)):
                kinds.append(event.kind)
                running = running or ray.get(actor.current.remote())
                if event.needs_decision:
                    stop = event.kind is EventKind.RUNG and event.payload.step == 30
                    actor.decide.remote(event.key, Decision(not stop, "enough"))
        outcome = ray.get(result)
        assert kinds == [EventKind.STARTED, EventKind.MEASURED, EventKind.RUNG, EventKind.RUNG]
        assert running["number"] == 3 and running["pid"]
        assert outcome.status is Outcome.PRUNED and outcome.reason == "enough"
        assert outcome.worker == "probe" and ray.get(actor.current.remote()) is None
    finally:
        ray.kill(actor)
