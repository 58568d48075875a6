// Starts Swagger UI on the OpenAPI document its page names: from a file, as the page's
// Content-Security-Policy runs no inline script.
"use strict";

(function startSwaggerUi() {
  const container = document.getElementById("swagger-ui");
  const options = {
    url: container.dataset.specUrl,
    domNode: container,
    // Swagger UI's default would show a badge from validator.swagger.io, which fetches the
    // document itself: an address of ours sent elsewhere, and an image the policy refuses.
    validatorUrl: null,
  };
  if (container.dataset.tryItOut !== "true") {
    // No "Try it out" (a service's page: its operations take only calls the gateway signs).
    options.supportedSubmitMethods = [];
  }
  window.ui = SwaggerUIBundle(options);
})();
