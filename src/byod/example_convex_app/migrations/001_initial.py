"""The notes app's first version on a Convex deployment: the deployment answers, runs
this app, and from now on records its version (the original plan's 001)."""

from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    answer = ctx.convex.query("functions:ping")
    if not isinstance(answer, dict) or answer.get("app") != "convex-notes":
        raise RuntimeError(f"the deployment does not run convex-notes (ping said {answer!r})")
    ctx.log.info("deployment answers; has documents: %s", answer.get("hasDocuments"))


migration = Migration(
    id="001_initial",
    version=1,
    name="Initial schema",
    description="Check the deployment runs the app and record version 1.",
    up=up,
    down=None,  # the first version cannot be undone, as in the original plan
)
