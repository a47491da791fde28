/* The subject report's interactive viewer (atlasflow.reports.viewer writes its markup).
 *
 * Everything it needs is in the page: #viewer-config (scenes, layers, volume metadata, JSON),
 * #viewer-vol-<key> (each volume as a base64 gzipped NIfTI) and #viewer-lib (NiiVue's UMD build,
 * base64 gzipped, unpacked with the browser's DecompressionStream), so it works from file:// with
 * no network. Without WebGL2 it says so and the static figures remain.
 * The hash #view=<scene id>[&mark=<name>] opens a scene at a marked point (the cohort page links so).
 */
(function () {
  'use strict';
  var root = document.getElementById('viewer-root');
  if (!root) { return; }
  var config = JSON.parse(document.getElementById('viewer-config').textContent);
  var sceneSelect = document.getElementById('viewer-scene');
  var layersBox = document.getElementById('viewer-layers');
  var flickerBox = document.getElementById('viewer-flicker');
  var statusBox = document.getElementById('viewer-location');
  var axisSelect = document.getElementById('viewer-axis');
  var sliceInput = document.getElementById('viewer-slice');
  var canvas = document.getElementById('viewer-canvas');
  var scenes = {};
  config.scenes.forEach(function (s) { scenes[s.id] = s; });

  var nv = null;          // the Niivue instance
  var lib = null;         // the niivue module
  var current = null;     // the scene shown
  var state = {};         // scene id -> key -> {visible, opacity}
  var images = {};        // scene id + key -> Promise<NVImage>
  var flicker = null;     // {timer, key, saved, button}

  function fallback(reason) {
    document.getElementById('viewer-fallback').hidden = false;
    canvas.parentNode.hidden = true;
    root.dataset.state = 'fallback';
    if (reason) { console.warn('atlasflow viewer: ' + reason); }
  }

  function webgl2() {
    try { return !!document.createElement('canvas').getContext('webgl2'); } catch (e) { return false; }
  }

  function bytes(id) {
    var text = document.getElementById(id).textContent.trim();
    var binary = atob(text);
    var out = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) { out[i] = binary.charCodeAt(i); }
    return out;
  }

  function loadLibrary() {
    if (window.niivue) { return Promise.resolve(window.niivue); }
    var stream = new Blob([bytes('viewer-lib')]).stream().pipeThrough(new DecompressionStream('gzip'));
    return new Response(stream).text().then(function (code) {
      (0, eval)(code);  // the UMD build defines window.niivue
      return window.niivue;
    });
  }

  function fmt(value, meta) {
    if (meta.kind === 'labels' || meta.kind === 'mask') { return String(Math.round(value)); }
    var digits = meta.step > 0 ? Math.max(0, Math.min(6, Math.ceil(-Math.log10(meta.step)) + 1)) : 3;
    return Number(value).toFixed(digits);
  }

  function labelColours(max) {
    var cm = {R: [], G: [], B: [], A: [], I: [], labels: []};
    for (var v = 0; v <= max; v++) {
      var h = (v * 137.508) % 360 / 60, c = 0.75, x = c * (1 - Math.abs(h % 2 - 1)), m = 0.2;
      var rgb = h < 1 ? [c, x, 0] : h < 2 ? [x, c, 0] : h < 3 ? [0, c, x] : h < 4 ? [0, x, c] : h < 5 ? [x, 0, c] : [c, 0, x];
      cm.R.push(Math.round(255 * (rgb[0] + m))); cm.G.push(Math.round(255 * (rgb[1] + m)));
      cm.B.push(Math.round(255 * (rgb[2] + m))); cm.A.push(v === 0 ? 0 : 255); cm.I.push(v);
      cm.labels.push(String(v));
    }
    return cm;
  }

  // masks are drawn through a two-entry table: 0 transparent black, 1 the layer's colour
  var MASK_COLOURS = {red: [230, 40, 40], cyan: [0, 220, 230], yellow: [255, 220, 0], blue: [40, 110, 255]};

  function maskColours(name) {
    var rgb = MASK_COLOURS[name] || MASK_COLOURS.red;
    return {R: [0, rgb[0]], G: [0, rgb[1]], B: [0, rgb[2]], A: [0, 255], I: [0, 1], labels: ['0', '1']};
  }

  function layerState(scene, layer) {
    state[scene.id] = state[scene.id] || {};
    if (!state[scene.id][layer.key]) {
      state[scene.id][layer.key] = {visible: layer.visible, opacity: layer.opacity};
    }
    return state[scene.id][layer.key];
  }

  function effectiveOpacity(scene, layer, index) {
    var s = layerState(scene, layer);
    return index === 0 ? 1 : (s.visible ? s.opacity : 0);
  }

  function loadImage(scene, layer, index) {
    var id = scene.id + '|' + layer.key;
    if (images[id]) { return images[id]; }
    var meta = config.volumes[layer.key];
    var d = meta.display;
    var options = {
      base64: document.getElementById('viewer-vol-' + layer.key).textContent.trim(),
      name: meta.name + '.nii.gz',
      colormap: meta.kind === 'labels' || meta.kind === 'mask' ? 'gray' : layer.colormap,
      opacity: effectiveOpacity(scene, layer, index),
      cal_min: d[0],
      cal_max: d[1],
      colorbarVisible: meta.kind === 'signed' || meta.kind === 'magnitude'
    };
    if (meta.kind === 'signed') {
      options.cal_min = 0.1 * d[1];
      options.colormapNegative = 'winter';
    } else if (meta.kind === 'magnitude') {
      options.cal_min = 0.1 * d[1];
    } else if (meta.kind === 'image') {
      // an overlay is transparent below cal_min: keep every voxel of a scan above it
      options.cal_min = Math.min(d[0], meta.min - meta.step);
    }
    images[id] = lib.NVImage.loadFromBase64(options).then(function (image) {
      if (meta.kind === 'labels') { image.setColormapLabel(labelColours(Math.round(d[1]))); }
      if (meta.kind === 'mask') { image.setColormapLabel(maskColours(layer.colormap)); }
      return image;
    });
    return images[id];
  }

  function applyOpacities() {
    // every opacity first, then one update: NiiVue's setOpacity re-blends all volumes per call,
    // which a scene with a dozen layers (several contrasts) felt on every flicker step
    var changed = false;
    current.layers.forEach(function (layer, i) {
      if (i >= nv.volumes.length) { return; }
      var kind = config.volumes[layer.key].kind;
      var opacity = effectiveOpacity(current, layer, i);
      // a colour bar for each map that is shown
      nv.volumes[i].colorbarVisible = opacity > 0 && (kind === 'signed' || kind === 'magnitude');
      if (nv.volumes[i].opacity !== opacity) { nv.volumes[i].opacity = opacity; changed = true; }
    });
    if (changed) { nv.updateGLVolume(); } else { nv.drawScene(); }
  }

  function layerControls(scene) {
    layersBox.textContent = '';
    scene.layers.forEach(function (layer, i) {
      var meta = config.volumes[layer.key];
      var row = document.createElement('div');
      row.className = 'viewer-layer';
      var label = document.createElement('label');
      var box = document.createElement('input');
      box.type = 'checkbox';
      box.dataset.key = layer.key;
      var s = layerState(scene, layer);
      box.checked = i === 0 || s.visible;
      box.disabled = i === 0;
      label.appendChild(box);
      label.appendChild(document.createTextNode(' ' + layer.name + (i === 0 ? ' (background)' : '')));
      row.appendChild(label);
      if (i > 0) {
        var slider = document.createElement('input');
        slider.type = 'range'; slider.min = '0'; slider.max = '100';
        slider.value = String(Math.round(100 * s.opacity));
        slider.title = 'opacity';
        slider.dataset.key = layer.key;
        slider.addEventListener('input', function () {
          s.opacity = slider.value / 100;
          if (!s.visible) { s.visible = true; box.checked = true; }
          applyOpacities();
        });
        box.addEventListener('change', function () { s.visible = box.checked; applyOpacities(); });
        row.appendChild(slider);
      }
      var info = document.createElement('div');
      info.className = 'muted';
      var kind = meta.kind === 'labels' || meta.kind === 'mask' ? meta.kind
        : 'range ' + fmt(meta.display[0], meta) + ' to ' + fmt(meta.display[1], meta) + ', step ' + Number(meta.step).toPrecision(2);
      info.textContent = meta.shape.join('\u00d7') + ' at ' + meta.spacing.map(function (v) { return v.toFixed(1); }).join('\u00d7') + ' mm; ' + kind;
      row.appendChild(info);
      layersBox.appendChild(row);
    });
    if (scene.notes.length) {
      var notes = document.createElement('div');
      notes.className = 'note';
      notes.textContent = 'missing: ' + scene.notes.join('; ');
      layersBox.appendChild(notes);
    }
  }

  function stopFlicker() {
    if (!flicker) { return; }
    clearInterval(flicker.timer);
    flicker.button.classList.remove('on');
    flicker.button.textContent = flicker.button.dataset.label;
    state[current.id] = flicker.saved;
    flicker = null;
    applyOpacities();
    layerControls(current);
  }

  // base: the overlay the flickered layer alternates with (drawn under it); none: the background
  function startFlicker(key, base, button) {
    var saved = JSON.parse(JSON.stringify(state[current.id]));
    flicker = {key: key, saved: saved, button: button, on: true};
    current.layers.forEach(function (layer, i) {
      if (i > 0) {
        layerState(current, layer).visible = layer.key === key || (!!base && layer.key === base);
        layerState(current, layer).opacity = 1;
      }
    });
    button.classList.add('on');
    var names = {};
    current.layers.forEach(function (l) { names[l.key] = l.name; });
    var other = base ? names[base] : current.layers[0].name;
    var tick = function () {
      layerState(current, {key: key}).visible = flicker.on;
      button.textContent = 'showing: ' + (flicker.on ? names[key] : other) + ' (stop)';
      flicker.on = !flicker.on;
      applyOpacities();
    };
    tick();
    flicker.timer = setInterval(tick, 600);
  }

  function flickerControls(scene) {
    flickerBox.textContent = '';
    scene.flicker.forEach(function (pair) {
      var button = document.createElement('button');
      button.type = 'button';
      button.dataset.key = pair.key;
      button.dataset.label = 'flicker ' + pair.label;
      button.textContent = button.dataset.label;
      button.addEventListener('click', function () {
        var again = flicker && flicker.button === button;
        stopFlicker();
        if (!again) { startFlicker(pair.key, pair.base, button); }
      });
      flickerBox.appendChild(button);
    });
  }

  function syncSlider() {
    var axis = Number(axisSelect.value);
    sliceInput.value = String(Math.round(1000 * nv.scene.crosshairPos[axis]));
  }

  function valuesAt(mm) {
    return current.layers.map(function (layer, i) {
      var image = nv.volumes[i];
      var vox = image.mm2vox(mm);
      var inside = vox.every(function (v, a) { return v >= 0 && v < image.hdr.dims[a + 1]; });
      var meta = config.volumes[layer.key];
      return layer.name + ' ' + (inside ? fmt(image.getValue(vox[0], vox[1], vox[2]), meta) : '\u2014');
    }).join('; ');
  }

  function describe(mm, what) {
    var where = Array.from(mm).slice(0, 3).map(function (v) { return v.toFixed(1); }).join(', ');
    return what + ' (' + where + ') mm RAS: ' + valuesAt(mm);
  }

  function show(id, mark) {
    var scene = scenes[id] || config.scenes[0];
    stopFlicker();
    current = scene;
    sceneSelect.value = scene.id;
    root.dataset.state = 'loading';
    return Promise.all(scene.layers.map(function (layer, i) { return loadImage(scene, layer, i); }))
      .then(function (loaded) {
        if (current !== scene) { return; }
        while (nv.volumes.length) { nv.removeVolume(nv.volumes[nv.volumes.length - 1]); }
        loaded.forEach(function (image) { nv.addVolume(image); });
        applyOpacities();
        layerControls(scene);
        flickerControls(scene);
        if (mark && scene.marks[mark]) {
          nv.scene.crosshairPos = nv.mm2frac(scene.marks[mark]);
        }
        nv.drawScene();
        nv.createOnLocationChange();
        syncSlider();
        root.dataset.state = 'ready';
        root.dataset.scene = scene.id;
      });
  }

  function fromHash() {
    var params = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (part) {
      var kv = part.split('=');
      if (kv.length === 2) { params[kv[0]] = decodeURIComponent(kv[1]); }
    });
    return params;
  }

  function start() {
    if (!webgl2()) { fallback('WebGL2 is not available'); return; }
    if (typeof DecompressionStream === 'undefined') { fallback('DecompressionStream is not available'); return; }
    root.dataset.state = 'loading';
    loadLibrary().then(function (module) {
      lib = module;
      nv = new lib.Niivue({
        backColor: [0, 0, 0, 1],
        isColorbar: true,
        show3Dcrosshair: false,
        crosshairWidth: 0.25,
        crosshairColor: [1, 0.25, 0.25, 0.8],
        multiplanarShowRender: 0,
        logLevel: 'warn'
      });
      return nv.attachToCanvas(canvas);
    }).then(function () {
      nv.setSliceType(nv.sliceTypeMultiplanar);
      nv.onLocationChange = function (data) {
        statusBox.textContent = describe(data.mm, 'cross-hair');
        syncSlider();
      };
      canvas.addEventListener('mousemove', function (event) {
        if (!current || root.dataset.state !== 'ready') { return; }
        var ratio = window.devicePixelRatio || 1;
        var frac = nv.canvasPos2frac([event.offsetX * ratio, event.offsetY * ratio]);
        if (frac[0] >= 0) { statusBox.textContent = describe(nv.frac2mm(frac), 'under cursor'); }
      });
      sceneSelect.addEventListener('change', function () { show(sceneSelect.value); });
      axisSelect.addEventListener('change', syncSlider);
      sliceInput.addEventListener('input', function () {
        var axis = Number(axisSelect.value);
        var pos = nv.scene.crosshairPos;
        pos[axis] = sliceInput.value / 1000;
        nv.drawScene();
        nv.createOnLocationChange(axis);
      });
      window.addEventListener('hashchange', function () {
        var params = fromHash();
        if (params.view) { show(params.view, params.mark); root.scrollIntoView(); }
      });
      var params = fromHash();
      if (params.view) { root.scrollIntoView(); }
      return show(params.view || config.initial, params.mark);
    }).catch(function (error) {
      fallback();
      console.error('atlasflow viewer: could not start: ' + (error && error.stack ? error.stack : error));
    });
  }

  start();
}());
