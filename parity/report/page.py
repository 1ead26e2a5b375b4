"""The HTML shell shared by the run report and the history index: inline CSS, inline JS, no external resource."""
from __future__ import annotations

from html import escape

CSS = """
:root{--pass:#1a7f37;--pass-bg:#dafbe1;--fail:#cf222e;--fail-bg:#ffebe9;--warn:#9a6700;--warn-bg:#fff8c5;
--ink:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--card:#fff;--accent:#0969da;
--mono:ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"Liberation Mono","DejaVu Sans Mono",monospace}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Liberation Sans",Arial,
sans-serif;color:var(--ink);background:var(--bg)}
.wrap{max-width:1260px;margin:0 auto;padding:0 20px}
code,.mono{font-family:var(--mono);font-size:12.5px}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
.banner{color:#fff;background:#424a53}
.banner.pass{background:linear-gradient(90deg,#1a7f37,#2da44e)}
.banner.fail{background:linear-gradient(90deg,#a40e26,#cf222e)}
.banner .wrap{display:flex;align-items:center;gap:22px;min-height:92px;padding-top:10px;padding-bottom:10px}
.verdict{font-size:46px;font-weight:800;letter-spacing:.06em;line-height:1;padding:10px 18px;
border:3px solid rgba(255,255,255,.85);border-radius:10px}
.btitle{flex:1;min-width:0}
.btitle h1{margin:0;font-size:24px;font-weight:650;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.btitle .meta{margin-top:4px;font-size:14px;opacity:.95}
.btitle .meta b{font-weight:650}
.bstats{text-align:right;font-size:13px;opacity:.95;white-space:nowrap}
.bstats .big{font-size:22px;font-weight:700}
nav.toc{background:#fff;border-bottom:1px solid var(--line);position:sticky;top:0;z-index:5}
nav.toc .wrap{display:flex;gap:18px;height:34px;align-items:center;font-size:13px;overflow-x:auto}
nav.toc a{color:var(--muted);white-space:nowrap}nav.toc a:hover{color:var(--accent)}
section{margin:18px 0}
h2{font-size:17px;margin:0 0 10px;font-weight:650}
h2 .sub,h3 .sub{font-size:13px;font-weight:400;color:var(--muted);margin-left:8px;text-transform:none;
letter-spacing:0}
.changed{margin-top:14px;padding:10px 16px}.changed h3{margin:0 0 4px}
ul.changes{display:flex;flex-wrap:wrap;gap:4px 22px;margin:0;padding:0;list-style:none;font-size:13px}
h3.heatmode{text-transform:none;letter-spacing:0;font-size:13.5px;color:var(--ink);margin:12px 0 0}
h3.heatmode:first-child{margin-top:0}
h3{font-size:13px;margin:0 0 8px;font-weight:650;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.grid{display:grid;gap:14px}
.g3{grid-template-columns:1.2fr 1.1fr 1fr}.g2{grid-template-columns:1fr 1fr}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;min-width:0;
overflow-x:auto}
.card.bad{border-color:#ff8182;box-shadow:inset 4px 0 0 var(--fail)}
.card.good{box-shadow:inset 4px 0 0 var(--pass)}
.headline{font-family:var(--mono);font-size:16px;font-weight:700;word-break:break-all;margin:2px 0 8px}
.headline.bad{color:var(--fail)}.headline.good{color:var(--pass)}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;margin:0;font-size:13px}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.metrics{display:grid;grid-template-columns:1fr 1fr;gap:6px 16px}
.metric .k{font-size:11.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.metric .v{font-family:var(--mono);font-size:15px;font-weight:650;font-variant-numeric:tabular-nums}
.metric .v.bad{color:var(--fail)}
.strip{display:grid;grid-template-columns:repeat(5,1fr);gap:14px;margin-top:14px}
.tile{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:9px 14px}
.tile .k{font-size:11.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.tile .v{font-size:20px;font-weight:700;font-variant-numeric:tabular-nums}
.tile .v small{font-size:13px;font-weight:400;color:var(--muted)}
.tile.bad .v{color:var(--fail)}.tile.good .v{color:var(--pass)}.tile.warn .v{color:var(--warn)}
.muted{color:var(--muted)}.red{color:var(--fail)}.green{color:var(--pass)}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:11.5px;font-weight:700;letter-spacing:.03em;
white-space:nowrap}
.pill.ok{background:var(--pass-bg);color:var(--pass)}.pill.no{background:var(--fail-bg);color:var(--fail)}
.pill.info{background:#ddf4ff;color:#0550ae}.pill.warn{background:var(--warn-bg);color:var(--warn)}
.pill.big{font-size:13px;padding:2px 10px}
.tag{display:inline-block;font-size:11px;padding:0 6px;border-radius:4px;border:1px solid var(--line);
color:var(--muted);
font-family:var(--mono);margin-left:6px}
.tag.full{border-color:#8c959f;color:#24292f;background:#eef1f6}
svg.chart{width:100%;height:auto;display:block;font-family:inherit}
svg .ct{font-size:13px;font-weight:650;fill:#1f2328}
svg .tl{font-size:11px;fill:#57606a}svg .tl.bad{fill:#cf222e;font-weight:700}
.legend{font-size:12px;color:var(--muted);margin-top:4px}
.legend .sq{display:inline-block;width:9px;height:9px;border:1.3px solid #57606a;vertical-align:-1px}
.legend .ci{display:inline-block;width:9px;height:9px;border:1.3px solid #57606a;border-radius:50%;
vertical-align:-1px}
.legend .band{display:inline-block;width:14px;height:10px;background:#eef1f6;border:1px solid #d0d7de;
vertical-align:-1px}
.legend .ring{display:inline-block;width:11px;height:11px;border:1.8px solid #cf222e;border-radius:50%;
vertical-align:-2px}
.tablewrap{background:var(--card);border:1px solid var(--line);border-radius:8px;overflow:auto}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:4px 9px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:650;color:#424a53;position:sticky;top:0;z-index:1;white-space:nowrap}
table.sortable th:not(.nosort){cursor:pointer;user-select:none}
table.sortable th:not(.nosort):hover{color:var(--accent)}
th[data-dir=asc]::after{content:" \\25B2";font-size:9px}th[data-dir=desc]::after{content:" \\25BC";font-size:9px}
td.n{text-align:right;font-family:var(--mono);font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{font-family:var(--mono);overflow-wrap:normal;word-break:normal}td.nowrap{white-space:nowrap}
.regs .one{font-family:var(--mono);font-size:11.5px;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis;margin-top:2px}
table.runs th{white-space:normal}table.runs td{padding:4px 7px}
td.gate{white-space:nowrap;color:var(--muted)}
td.hit{font-weight:700}
tr.bad td{background:var(--fail-bg)}tr.bad td.hit{color:var(--fail)}
tr.grp td{background:#eef1f6;font-family:var(--mono);font-weight:650;border-top:1px solid var(--line)}
tr.grp td .cnt{float:right;font-family:inherit;font-weight:400;color:var(--muted)}
table.flat tr.grp{display:none}
table.failonly tbody tr:not(.bad):not(.grp),table.failonly tr.grp:not(.hasbad){display:none}
tr.hide,tr.off{display:none}
tr:target td,tr.fd td{box-shadow:inset 0 2px 0 var(--fail),inset 0 -2px 0 var(--fail)}
nav.toc .since{margin-left:auto;display:flex;gap:12px;color:var(--muted)}
nav.toc .since a{color:var(--accent)}
.pager button:disabled{opacity:.4;cursor:default}
.controls select{font:inherit;padding:2px 4px;border:1px solid var(--line);border-radius:6px;background:#fff}
table.heat{width:auto;border-collapse:separate;border-spacing:2px;font-size:11px}
table.heat th,table.heat td{border:0;padding:0;text-align:center}
table.heat th{position:static;background:none;font-weight:600;color:var(--muted);padding:0 2px}
table.heat th.full{color:#24292f;background:#eef1f6;border-radius:3px}
table.heat th.rowh{text-align:right;font-family:var(--mono);font-weight:400;padding-right:6px;white-space:nowrap}
table.heat td{width:26px;height:18px;border-radius:3px;font-size:10px;line-height:18px}
table.heat td.na{background:none}
table.heat td.zero{background:#f0f3f6;color:#afb8c1}
table.heat td.over{background:#cf222e;color:#fff;font-weight:700}
.heatscale{display:inline-block;width:160px;height:10px;vertical-align:-1px;border-radius:2px;
background:linear-gradient(90deg,#f0faf2,#8fd19e 83%,#fff3b0 83%,#fb8f44)}
table.fixed{table-layout:fixed}
#modtable td,#modtable th{padding:4px 6px}#modtable th{white-space:normal}
#modtable td.gate{white-space:normal;overflow-wrap:anywhere}
.why{font-size:11px;color:var(--muted);max-width:180px}.why.red{color:var(--fail)}
td.name .why{max-width:none;line-height:1.3;font-family:system-ui,sans-serif;overflow-wrap:anywhere}
.controls{display:flex;gap:14px;align-items:center;margin:0 0 8px;font-size:13px;flex-wrap:wrap}
.controls input[type=search]{font:inherit;padding:3px 8px;border:1px solid var(--line);border-radius:6px;width:260px}
.controls button{font:inherit;padding:3px 10px;border:1px solid var(--line);border-radius:6px;background:#fff;
cursor:pointer}
.empty{color:var(--muted);font-style:italic;padding:10px 0}
.bar{display:inline-block;height:9px;background:#8cb4ff;border-radius:2px;vertical-align:0}
details summary{cursor:pointer;color:var(--accent);margin:8px 0}
footer{color:var(--muted);font-size:12px;padding:24px 0 36px}
.runs td{vertical-align:middle}
.trend{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:14px}
.trend .spk{display:grid;grid-template-columns:140px 150px 1fr;align-items:center;gap:8px;font-size:12.5px}
.dots{display:flex;gap:2px;flex-wrap:wrap;margin:6px 0 8px}
.dots i{display:inline-block;width:9px;height:9px;border-radius:2px;background:var(--pass)}
.dots i.no{background:var(--fail)}
@media (max-width:1000px){.g3,.g2{grid-template-columns:1fr}.strip{grid-template-columns:repeat(2,1fr)}}
"""

SCRIPT = """
(function(){
  function val(td){
    var v=td.getAttribute('data-v');
    if(v===null)return td.textContent.trim().toLowerCase();
    if(v==='')return -Infinity;
    var f=parseFloat(v);return isNaN(f)?Infinity:f;
  }
  function each(list,fn){Array.prototype.forEach.call(list,fn);}
  each(document.querySelectorAll('table.sortable'),function(t){
    var heads=t.tHead.rows[0].cells,body=t.tBodies[0];
    each(heads,function(th,i){
      if(th.classList.contains('nosort'))return;
      th.addEventListener('click',function(){
        var dir=th.getAttribute('data-dir')==='desc'?'asc':'desc';
        each(heads,function(h){h.removeAttribute('data-dir');});
        th.setAttribute('data-dir',dir);
        var rows=Array.prototype.filter.call(body.rows,function(r){return !r.classList.contains('grp');});
        rows.sort(function(a,b){
          var x=val(a.cells[i]),y=val(b.cells[i]),c;
          if(typeof x==='number'&&typeof y==='number'){c=x===y?0:(x<y?-1:1);}
          else{c=String(x).localeCompare(String(y));}
          return dir==='asc'?c:-c;
        });
        t.classList.add('flat');
        rows.forEach(function(r){body.appendChild(r);});
        t.dispatchEvent(new Event('sorted'));
      });
    });
  });
  each(document.querySelectorAll('[data-regroup]'),function(btn){
    btn.addEventListener('click',function(){
      var t=document.getElementById(btn.getAttribute('data-regroup')),body=t.tBodies[0];
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){return (+a.getAttribute('data-i'))-(+b.getAttribute('data-i'));});
      rows.forEach(function(r){body.appendChild(r);});
      t.classList.remove('flat');
      refilter(t);
      each(t.tHead.rows[0].cells,function(h){h.removeAttribute('data-dir');});
    });
  });
  function refilter(t){
    var inp=document.querySelector('[data-filter="'+t.id+'"]'),cb=document.querySelector('[data-failonly="'+t.id+'"]');
    var q=inp?inp.value.trim().toLowerCase():'',fo=!!(cb&&cb.checked),head=null,any=false;
    t.classList.toggle('failonly',fo);
    function close(){if(head)head.classList.toggle('off',!any);}
    each(t.tBodies[0].rows,function(r){
      if(r.classList.contains('grp')){close();head=r;any=false;return;}
      var s=(r.getAttribute('data-s')||r.textContent).toLowerCase();
      var show=(q===''||s.indexOf(q)>=0)&&(!fo||r.classList.contains('bad'));
      r.classList.toggle('hide',!show);
      if(show)any=true;
    });
    close();
  }
  each(document.querySelectorAll('[data-failonly]'),function(cb){
    var t=document.getElementById(cb.getAttribute('data-failonly'));
    cb.addEventListener('change',function(){refilter(t);});
    refilter(t);
  });
  each(document.querySelectorAll('[data-filter]'),function(inp){
    var t=document.getElementById(inp.getAttribute('data-filter'));
    inp.addEventListener('input',function(){refilter(t);});
  });
  each(document.querySelectorAll('tr.fd'),function(row){
    var wrap=row.closest('.tablewrap');
    if(!wrap||location.hash)return;
    var head=wrap.querySelector('thead'),h=head?head.getBoundingClientRect().height:0;
    wrap.scrollTop+=row.getBoundingClientRect().top-wrap.getBoundingClientRect().top-h-4;
  });
  each(document.querySelectorAll('[data-pager]'),function(pager){
    var t=document.getElementById(pager.getAttribute('data-pager')),size=+pager.getAttribute('data-size')||200;
    var info=pager.querySelector('.pageinfo'),page=0;
    var sels=document.querySelectorAll('[data-hfilter]');
    function want(r){
      var ok=true;
      each(sels,function(el){
        var k=el.getAttribute('data-hfilter');
        if(el.type==='checkbox'){if(el.checked&&!(+r.getAttribute('data-'+k)>0))ok=false;}
        else if(el.value!==''&&r.getAttribute('data-'+k)!==el.value)ok=false;
      });
      return ok;
    }
    function show(){
      var rows=Array.prototype.filter.call(t.tBodies[0].rows,function(r){r.classList.add('off');return want(r);});
      var pages=Math.max(1,Math.ceil(rows.length/size));
      page=Math.min(Math.max(page,0),pages-1);
      rows.slice(page*size,(page+1)*size).forEach(function(r){r.classList.remove('off');});
      info.textContent='page '+(page+1)+' of '+pages+' · '+rows.length+' run'+(rows.length===1?'':'s');
      pager.querySelector('[data-page="-1"]').disabled=page===0;
      pager.querySelector('[data-page="1"]').disabled=page>=pages-1;
    }
    each(pager.querySelectorAll('[data-page]'),function(b){
      b.addEventListener('click',function(){page+=+b.getAttribute('data-page');show();});
    });
    each(sels,function(el){el.addEventListener('change',function(){page=0;show();});});
    t.addEventListener('sorted',function(){page=0;show();});
    show();
  });
  document.documentElement.setAttribute('data-js','ok');
})();
"""


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document (inline CSS and JS, no external references)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")
