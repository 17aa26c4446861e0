"""What fits a budget: the largest batch, the options, the printed report."""

from engine.device.memory.model import predict
from engine.device.memory.report import format_report, recommend


def test_recommendation_finds_the_largest_batch_that_fits(attention, make_config):
    config = make_config(attention, batch_size=64)
    rec = recommend(config, budget_mb=120)
    assert predict(config, rec.max_batch).train_step_mb <= 120
    assert predict(config, rec.max_batch + 1).train_step_mb > 120
    assert not rec.fits and "use batch <=" in rec.reason
    by_name = {o.name: o for o in rec.options}
    assert by_name["checkpointing"].saving_mb > 0 and by_name["checkpointing"].time_factor > 1
    assert by_name["checkpointing"].max_batch > rec.max_batch
    nothing = recommend(config, budget_mb=1)
    assert not nothing.fits and nothing.max_batch == 0 and "does not fit at all" in nothing.reason
    report = format_report(config, budget_mb=120)
    assert "   256 " in report and "largest float32 batch" in report
