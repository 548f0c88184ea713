from django.apps import AppConfig


class ConsentConfig(AppConfig):
    name = "consent"
    verbose_name = "Agents and consent"

    def ready(self) -> None:
        from django.conf import settings

        from . import checks  # noqa: F401  (registers system checks)
        from .conf import validate

        validate(getattr(settings, "COUNTERSIGN", {}))
