from tools.configdoc import README, readme_with_table


def test_readme_config_table_matches_settings():
    text = README.read_text()
    assert readme_with_table(text) == text, "README config table is stale: run python -m tools.configdoc --write"


def _routes_in_readme() -> set[tuple[str, str]]:
    """Every `METHOD /path` the README's API section names, with `{...}` folded."""
    import re

    text = README.read_text()
    api = text[text.index("## API") : text.index("## Claim and own a database")]
    found = re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)", api)
    return {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in found}


def _routes_in_app() -> set[tuple[str, str]]:
    import re

    from app import app

    return {(method, re.sub(r"\{[^}]*\}", "{}", path)) for path, entries in app.routes.items() for method in entries}


def test_readme_route_table_matches_the_app():
    in_readme, in_app = _routes_in_readme(), _routes_in_app()
    assert in_app - in_readme == set(), "routes the README's API section does not name"
    assert in_readme - in_app == set(), "routes the README names that the app does not have"
