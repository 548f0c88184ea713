from django.apps import AppConfig


class ConsentConfig(AppConfig):
    name = "consent"
    verbose_name = "Agents and consent"

    def ready(self):
        from . import checks  # noqa: F401  (registers system checks)
