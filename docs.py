"""The API's documentation: openapi.json as shipped, and Swagger UI to read it, served
from the swagger-ui-bundle package so that the docs work offline."""

import json

from flask import Blueprint, Flask, current_app, render_template, url_for
from swagger_ui_bundle import swagger_ui_path

docs = Blueprint("docs", __name__, static_folder=swagger_ui_path, static_url_path="/docs")


@docs.get("/openapi.json")
def openapi_document():
    return current_app.extensions["fleetmon.openapi"]


@docs.get("/docs/")
def docs_page():
    return render_template("docs.html", openapi_spec_url=url_for(".openapi_document"))


def init_app(app: Flask) -> None:
    with app.open_resource("openapi.json") as document:
        app.extensions["fleetmon.openapi"] = json.load(document)
    app.register_blueprint(docs)
