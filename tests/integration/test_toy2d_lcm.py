"""End to end on toy2d: `stepdistill train experiment=toy2d/lcm` converges (issue 5).

Convergence threshold: the 4-step LCM student's swd <= 1.5x the teacher's 100-step swd, with full
mode coverage. Measured with this config (one thread, seed 0, as here): swd 0.0742 vs the teacher's
0.0787 (0.94x), coverage 1.0, class accuracy 99.98%; 1 step 0.0946; 1,000 iterations in 60-90 s. The run directory's student loads back as
the consistency student it was trained as (`stepdistill eval` at other step counts).
"""

import json

from stepdistill.cli import main
from stepdistill.pipelines.few_step import load_run
from stepdistill.roles import ConsistencyGenerator


def test_four_step_lcm_student_matches_the_teacher(train_toy2d, one_thread):
    run, metrics = train_toy2d("toy2d/lcm")
    student, teacher = metrics["student"], metrics["teacher"]
    assert (metrics["experiment"], metrics["algorithm"]) == ("toy2d/lcm", "ConsistencyDistillation")
    assert student["steps"] == 4 and student["nfe"] == 4 and teacher["steps"] == 100
    assert student["metrics"]["swd"] <= 1.5 * teacher["metrics"]["swd"], (student, teacher)
    assert student["metrics"]["mode_coverage"] == 1.0 and student["metrics"]["class_accuracy"] >= 0.95
    loaded = load_run(run).generator
    assert isinstance(loaded, ConsistencyGenerator) and loaded.timestep_scaling == 10.0
    assert main(["eval", f"run={run}", "steps=1", "teacher_steps=100"]) == 0
    one_step = json.loads((run / "metrics.json").read_text())["student"]
    assert one_step["steps"] == 1 and one_step["metrics"]["swd"] <= 1.5 * teacher["metrics"]["swd"], one_step
