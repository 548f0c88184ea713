"""Prompts that reach people where they are: Web Push to their devices, email, and a signed webhook
per organisation, beside the live inbox's websocket. Every channel only carries news of the prompt
(its server-written headline and a link to it); deciding still needs the signed-in inbox."""
