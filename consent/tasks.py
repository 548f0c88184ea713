from celery import shared_task

from .services import grants_expire as _grants_expire


@shared_task(name="consent.tasks.grants_expire", ignore_result=True)
def grants_expire() -> int:
    """Mark session grants past their lifetime expired and end their tokens (idempotent)."""
    return _grants_expire()
