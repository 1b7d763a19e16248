"""Every player's wins, counted from the matches (convex-helpers' getManyFrom)."""

from byod import Backfill, Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    ctx.log.info("counting wins")


migration = Migration(
    id="001_count_wins",
    version=1,
    name="Count wins",
    description="players.wins from the matches each won.",
    up=up,
    backfills=[Backfill(table="players", page="players:winsPage", batch_size=2)],
)
