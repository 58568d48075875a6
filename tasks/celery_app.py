"""The one Celery app, configured from `celeryconfig`, with the inbox consumer as a worker step."""

from celery import Celery
from click import Option

app = Celery("hseshop", include=["tasks.relay", "tasks.inbox"])
app.config_from_object("celeryconfig")

app.user_options["worker"].add(
    Option(
        ["--consume"],
        multiple=True,
        default=(),
        help="Run the Kafka inbox consumer of this service in the worker (orders or payments).",
    )
)


def _install_consumer_step() -> None:
    from tasks.consumer import InboxConsumerStep

    app.steps["worker"].add(InboxConsumerStep)


_install_consumer_step()
