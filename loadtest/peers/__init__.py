"""`psad bench peers`: the same reranking behind other servers (issue 19). work: what every peer does
per request; fastapi_app, bento_service, ray_app, litserve_app: the peers; registry: how each is
started; venvs: the framework peers' own virtualenvs; run: the phases and the command; report: the
markdown."""
