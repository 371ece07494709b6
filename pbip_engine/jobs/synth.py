"""``synth`` stage: the deterministic synthetic cohort, when the spec asks for one."""

from __future__ import annotations

from pbip_engine.jobs.stage import Stage, StageContext, StageResult, register_stage
from pbip_engine.schemas.spec import JobSpec


@register_stage
class SynthStage(Stage):
    name = "synth"
    version = 2  # v2: dense annotation areas (multi-label tiles)
    sections = ("data",)

    def enabled(self, spec: JobSpec) -> bool:
        return spec.data.synthetic is not None

    def run(self, ctx: StageContext) -> StageResult:
        from tqdm.auto import tqdm

        from pbip_engine.engine.synth import write_cohort

        s = ctx.spec.data.synthetic
        assert s is not None
        with tqdm(total=s.slides, desc="synth slides", unit="slide", disable=not ctx.progress) as bar:
            # progress(k) reports the k-th slide done (a count, not an increment)
            cohort = write_cohort(
                ctx.work_dir, s.slides, s.size, s.seed, mpp=s.mpp, progress=lambda k: bar.update(k - bar.n)
            )
        return StageResult(counts={"slides": len(cohort["slides"]), "size": s.size})
